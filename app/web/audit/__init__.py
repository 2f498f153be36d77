"""The audit pages of the console."""

from flask import Blueprint

from ..console import install

bp = Blueprint("audit", __name__)
install(bp)

from . import routes  # noqa: E402,F401
