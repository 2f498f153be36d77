"""The queues pages of the console."""

from flask import Blueprint

from ..console import install

bp = Blueprint("queues", __name__)
install(bp)

from . import routes  # noqa: E402,F401
