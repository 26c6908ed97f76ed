"""
The HTTP face of the gateway: REST routes, the channels WebSocket, auth and
CORS, JSON errors and the OpenAPI document.  No kernel logic lives here.
"""
