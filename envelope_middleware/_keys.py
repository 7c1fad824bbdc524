"""Keys the middleware leaves in a request's scope, shared with its other modules."""

# Set on the scope of every request the middleware handles; a second instance
# further in sees it and steps aside, so a double mount gives one envelope.
SCOPE_KEY = "envelope_middleware.request_id"
# Where `envelope_middleware.handlers` leaves an exception, in the request's state,
# for the middleware to answer for when the app's stand-in error response arrives.
HANDED_OVER_KEY = "envelope_middleware.exception"
