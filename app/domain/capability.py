"""What an EHR's CapabilityStatement promises, summarised so a change between two fetches can be
named (drift kind `capability_change`): FHIR version, software, and per resource type the
interactions and search parameters it supports. Pure functions over the parsed JSON."""

from __future__ import annotations

import json


def capability_summary(doc: object) -> str:
    """A stable, compact JSON summary of a CapabilityStatement ("" for anything else)."""
    if not isinstance(doc, dict) or doc.get("resourceType") != "CapabilityStatement":
        return ""
    software = doc.get("software") if isinstance(doc.get("software"), dict) else {}
    resources: dict[str, list[str]] = {}
    for rest in doc.get("rest") or []:
        if not isinstance(rest, dict):
            continue
        for res in rest.get("resource") or []:
            if not isinstance(res, dict) or not isinstance(res.get("type"), str):
                continue
            marks = {
                f"i:{i['code']}"
                for i in res.get("interaction") or []
                if isinstance(i, dict) and isinstance(i.get("code"), str)
            }
            marks |= {
                f"s:{p['name']}"
                for p in res.get("searchParam") or []
                if isinstance(p, dict) and isinstance(p.get("name"), str)
            }
            if res.get("conditionalCreate") is True:
                marks.add("conditionalCreate")
            resources[res["type"][:64]] = sorted(m[:80] for m in marks)[:200]
    summary = {
        "fhirVersion": str(doc.get("fhirVersion") or "")[:20],
        "software": f"{software.get('name', '')} {software.get('version', '')}".strip()[:120],
        "resources": dict(sorted(resources.items())[:200]),
    }
    return json.dumps(summary, sort_keys=True, separators=(",", ":"))


def capability_difference(before: str, after: str) -> str:
    """What changed between two summaries, in words an operator reads on the dashboard."""
    try:
        old, new = json.loads(before), json.loads(after)
    except (TypeError, ValueError):
        return "CapabilityStatement changed"
    changes = []
    for key in ("fhirVersion", "software"):
        if old.get(key) != new.get(key):
            changes.append(f"{key} {old.get(key) or '—'} → {new.get(key) or '—'}")
    old_res, new_res = old.get("resources", {}), new.get("resources", {})
    if added := sorted(set(new_res) - set(old_res)):
        changes.append("resources added: " + ", ".join(added[:8]))
    if removed := sorted(set(old_res) - set(new_res)):
        changes.append("resources removed: " + ", ".join(removed[:8]))
    for rtype in sorted(set(old_res) & set(new_res)):
        gone = sorted(set(old_res[rtype]) - set(new_res[rtype]))
        came = sorted(set(new_res[rtype]) - set(old_res[rtype]))
        if gone or came:
            parts = [f"-{m}" for m in gone[:4]] + [f"+{m}" for m in came[:4]]
            changes.append(f"{rtype} {' '.join(parts)}")
    return "; ".join(changes)[:500] or "CapabilityStatement changed"
