"""Bulk replay pages of the console: request from a queue selection, approve once, watch, pause,
cancel (issue 6)."""

from flask import Blueprint

from ..console import install

bp = Blueprint("bulk_replays", __name__)
install(bp)

from . import routes  # noqa: E402,F401
