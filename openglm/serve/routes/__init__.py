"""The HTTP routes, one module per API, each route thin over the services (``openglm.serve.services``)."""
