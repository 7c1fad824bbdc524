-- Keyed writes for writes.py: PATCH /items/1/availability as the demo partner.
-- WRK_KEYS=unique gives every request a new Idempotency-Key (first writes);
-- WRK_KEYS=same gives every request one key (replays). WRK_RUN keeps runs apart.
local mode = os.getenv("WRK_KEYS") or "unique"
local run = os.getenv("WRK_RUN") or tostring(os.time())
local threads = 0
local counter = 0
local headers = {
    ["Authorization"] = "Basic ZGVtb19wYXJ0bmVyOmRlbW9fc2VjcmV0",
    ["Content-Type"] = "application/json",
}
local body = '{"available": true}'

function setup(thread)
    threads = threads + 1
    thread:set("tid", threads)
end

function request()
    counter = counter + 1
    if mode == "same" then
        headers["Idempotency-Key"] = "replayed-" .. run
    else
        headers["Idempotency-Key"] = run .. "-" .. tostring(tid) .. "-" .. counter
    end
    return wrk.format("PATCH", nil, headers, body)
end
