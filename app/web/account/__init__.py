"""A person's own account: their API tokens, and the one-time enrollment link."""

from flask import Blueprint

from ..console import install

bp = Blueprint("account", __name__)
install(bp)

from . import routes  # noqa: E402,F401
