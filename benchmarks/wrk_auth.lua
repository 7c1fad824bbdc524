-- Every wrk request carries the demo gateway's credentials; the other stacks ignore them.
wrk.headers["Authorization"] = "Basic ZGVtb19wYXJ0bmVyOmRlbW9fc2VjcmV0"
