"""The producer's routes, one router per concern; ``producer.app`` includes them in order.

FastAPI includes a router as one entry of ``app.routes``, so what needs the routes one by one
(the request guard's JSON routes, tests of the route table) reads ``api_routes()``.
"""

from fastapi.routing import APIRoute

from producer.routes import challenges, health, jobs, keys

ROUTERS = (health.router, challenges.router, jobs.router, keys.router)


def api_routes() -> list[APIRoute]:
    """Every route of the API, with its full path."""
    return [route for router in ROUTERS for route in router.routes if isinstance(route, APIRoute)]


__all__ = ["ROUTERS", "api_routes"]
