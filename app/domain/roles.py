"""Roles (SPEC 3.4) and the permissions each one holds.

Every request passes one access check (app.web.access) that asks `has_permission`.
"""

from enum import StrEnum


class Role(StrEnum):
    REVIEWER = "reviewer"
    CLINICAL_LEAD = "clinical_lead"
    AUDITOR = "auditor"
    ADMIN = "admin"
    SERVICE = "service"


class Permission(StrEnum):
    CONSOLE_LOGIN = "console_login"
    VIEW_QUEUES = "view_queues"
    VIEW_PAYLOAD = "view_payload"
    DECIDE = "decide"  # reviewer-level actions; the state machine checks each action's roles
    APPROVE = "approve"
    VIEW_AUDIT = "view_audit"
    EXPORT_AUDIT = "export_audit"
    ADMIN = "admin"
    SUBMIT_MESSAGES = "submit_messages"
    READ_MESSAGES = "read_messages"


ROLE_PERMISSIONS: dict[Role, frozenset[Permission]] = {
    Role.REVIEWER: frozenset(
        {Permission.CONSOLE_LOGIN, Permission.VIEW_QUEUES, Permission.VIEW_PAYLOAD, Permission.DECIDE}
    ),
    Role.CLINICAL_LEAD: frozenset(
        {
            Permission.CONSOLE_LOGIN,
            Permission.VIEW_QUEUES,
            Permission.VIEW_PAYLOAD,
            Permission.DECIDE,
            Permission.APPROVE,
        }
    ),
    Role.AUDITOR: frozenset(
        {
            Permission.CONSOLE_LOGIN,
            Permission.VIEW_QUEUES,
            Permission.VIEW_PAYLOAD,
            Permission.VIEW_AUDIT,
            Permission.EXPORT_AUDIT,
        }
    ),
    Role.ADMIN: frozenset(
        {
            Permission.CONSOLE_LOGIN,
            Permission.VIEW_QUEUES,
            Permission.ADMIN,
            Permission.VIEW_AUDIT,
            Permission.READ_MESSAGES,
        }
    ),
    Role.SERVICE: frozenset({Permission.SUBMIT_MESSAGES, Permission.READ_MESSAGES}),
}


def has_permission(role: str | Role, permission: Permission) -> bool:
    """True when `role` holds `permission`. Unknown roles hold nothing."""
    try:
        return permission in ROLE_PERMISSIONS[Role(role)]
    except ValueError:
        return False


def masks_patient_identifiers(role: str | Role) -> bool:
    """Auditors, reviewers and admins see patient identifiers masked (SPEC 3.4). The rule itself
    lives in one place, app.domain.phi.PHI_RULE, which the response filter applies too."""
    from .phi import PHI_RULE

    return PHI_RULE.masks(role)


def mask_identifier(value: str | None) -> str:
    """`Patient/123456` -> `Patient/****56`: enough to tell rows apart, not to identify."""
    if not value:
        return ""
    prefix, _, ident = value.rpartition("/")
    shown = ident[-2:] if len(ident) > 4 else ""
    masked = "*" * max(4, len(ident) - len(shown)) + shown
    return f"{prefix}/{masked}" if prefix else masked
