from flask import Blueprint

bp = Blueprint("api", __name__, url_prefix="/api/v1")

from . import actions, admin_routes, bulk_replays, routes  # noqa: E402,F401
