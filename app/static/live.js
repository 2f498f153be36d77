// Reconciliation Console: live pages, focus after swaps, keyboard shortcuts (issue 8).
// Everything here is an enhancement: without it every page and action still works (links and
// plain form posts). No eval, no inline script (the CSP forbids both).
(function () {
  "use strict";

  // Refreshes the page makes by itself: the server does not count them as the person's activity.
  var LIVE = { "X-Recon-Live": "1" };
  var newIds = {}; // exception id -> true: rows that appeared while this page was open
  var refreshing = false; // a live refresh (not a user's filter) is in flight
  var saved = null; // what a live refresh must keep: selection, focus, scroll

  function $(sel, root) { return (root || document).querySelector(sel); }
  function $all(sel, root) { return Array.prototype.slice.call((root || document).querySelectorAll(sel)); }

  function announce(text) {
    var region = document.getElementById("live-status");
    if (!region) return;
    region.textContent = "";
    // A fresh text node after a tick, so screen readers announce a repeated message too.
    window.setTimeout(function () { region.textContent = text; }, 50);
  }

  function rowIds() { return $all("tr[data-row]").map(function (tr) { return tr.dataset.row; }); }

  // --- live polling --------------------------------------------------------------------------
  // The poller (hx-get /queues/changes, every 5 s) sends the token it last saw; 204 = nothing
  // changed. On a change the server sends HX-Trigger "recon:changed" with the new token.
  document.addEventListener("htmx:configRequest", function (e) {
    var elt = e.detail.elt;
    if (elt && elt.hasAttribute && elt.hasAttribute("data-live-poll")) {
      e.detail.parameters.since = elt.dataset.since || "";
    }
  });

  document.addEventListener("htmx:confirm", function (e) {
    // Hidden tabs do not poll; a refresh already running is not doubled.
    var elt = e.detail.elt;
    if (elt && elt.hasAttribute && elt.hasAttribute("data-live-poll") && (document.hidden || refreshing)) {
      e.preventDefault();
    }
  });

  document.addEventListener("htmx:afterRequest", function (e) {
    var elt = e.detail.elt;
    if (!(elt && elt.hasAttribute && elt.hasAttribute("data-live-poll"))) return;
    var checked = $("[data-live-checked]", elt);
    if (checked && e.detail.successful) {
      var now = new Date();
      checked.textContent = " · checked " + now.toTimeString().slice(0, 8);
    }
  });

  document.addEventListener("recon:changed", function (e) {
    var detail = e.detail || {};
    var poller = $("[data-live-poll]");
    if (poller && detail.token) poller.dataset.since = detail.token;
    if ($("#queue-results") && detail.rows) refreshQueue();
    else if ($("#dashboard-live")) refreshDashboard();
  });

  function refreshQueue() {
    if (!window.htmx || refreshing) return;
    refreshing = true;
    window.htmx
      .ajax("GET", window.location.pathname + window.location.search, {
        target: "#queue-results",
        swap: "outerHTML",
        headers: LIVE,
      })
      .finally(function () { refreshing = false; });
  }

  function refreshDashboard() {
    if (!window.htmx || refreshing) return;
    refreshing = true;
    window.htmx
      .ajax("GET", window.location.pathname, { target: "#dashboard-live", swap: "outerHTML", headers: LIVE })
      .finally(function () { refreshing = false; });
  }

  function keyOf(el) {
    // How to find the focused element again in the new rows.
    if (!el || el === document.body) return null;
    if (el.id) return "#" + el.id;
    var row = el.closest && el.closest("tr[data-row]");
    if (row && el.matches("[data-row-link]")) return "#ex-" + row.dataset.row + " [data-row-link]";
    return null;
  }

  document.addEventListener("htmx:beforeSwap", function (e) {
    if (!(e.detail.target && e.detail.target.id === "queue-results")) return;
    var checked = {};
    $all('input[name=ids][form="bulk-form"]:checked').forEach(function (b) {
      checked[b.value.split(":")[0]] = b.value;
    });
    saved = {
      live: refreshing,
      before: rowIds(),
      checked: checked,
      focus: keyOf(document.activeElement),
      scrollX: window.scrollX,
      scrollY: window.scrollY,
    };
  });

  // htmx fires afterSettle on every element it settled (out-of-band ones too), each with the
  // request's target in detail: act once, on the target's own event.
  function ownSettle(e) {
    var target = e.detail.target;
    return target && e.target && (e.target === target || (target.id && e.target.id === target.id));
  }

  document.addEventListener("htmx:afterSettle", function (e) {
    if (ownSettle(e) && e.target.id === "queue-results") afterResults();
  });

  function afterResults() {
    var state = saved || { live: false, before: [], checked: {} };
    saved = null;
    var results = $("#queue-results");
    if (!results) return;
    // Selection survives the swap. A row keeps the version it was selected at, so the bulk
    // confirmation still flags it "changed" if it moved meanwhile.
    Object.keys(state.checked).forEach(function (id) {
      var box = document.getElementById("sel-" + id);
      if (box) { box.checked = true; box.value = state.checked[id]; }
    });
    if (state.live) {
      var before = {};
      state.before.forEach(function (id) { before[id] = true; });
      var fresh = rowIds().filter(function (id) { return !before[id]; });
      fresh.forEach(function (id) { newIds[id] = true; });
      markNew();
      if (fresh.length) announce(fresh.length + " new item" + (fresh.length === 1 ? "" : "s") + " in this queue");
      var again = state.focus && $(state.focus);
      if (again) again.focus({ preventScroll: true });
      window.scrollTo(state.scrollX, state.scrollY);
    } else {
      markNew();
      // A filter or page change: say how many match, and put focus on the results, not <body>.
      var summary = $("[data-result-summary]", results);
      if (summary) announce(summary.textContent.replace(/\s+/g, " ").trim());
      if (!document.activeElement || document.activeElement === document.body || !document.contains(document.activeElement)) {
        results.focus({ preventScroll: true });
      }
      updateSavedQuery();
    }
    document.dispatchEvent(new Event("change"));
  }

  function markNew() {
    Object.keys(newIds).forEach(function (id) {
      var row = document.getElementById("ex-" + id);
      if (!row || row.classList.contains("row-new")) return;
      row.classList.add("row-new");
      var link = $("[data-row-link]", row);
      if (link) {
        var badge = document.createElement("span");
        badge.className = "badge badge-new";
        badge.textContent = "new";
        link.parentNode.appendChild(document.createTextNode(" "));
        link.parentNode.appendChild(badge);
      }
    });
  }

  // Any other swap (approvals, detail forms, the dashboard): when the swap took away the element
  // that had focus, focus goes to the new content (its alert, status or heading), not <body>.
  var focusInside = null;
  document.addEventListener("htmx:beforeSwap", function (e) {
    var target = e.detail.target, active = document.activeElement;
    focusInside = target && active && active !== document.body && target.contains(active) ? keyOf(active) || true : null;
  });

  document.addEventListener("htmx:afterSettle", function (e) {
    if (!ownSettle(e)) return;
    var target = e.target;
    var had = focusInside;
    focusInside = null;
    if (!had || !target || target.id === "queue-results") return;
    var active = document.activeElement;
    if (active && active !== document.body && document.contains(active)) return;
    if (typeof had === "string" && $(had)) { $(had).focus({ preventScroll: true }); return; }
    var focusable = target.isConnected ? target : document.getElementById(target.id);
    if (!focusable) return;
    var heading = $("[role=alert], [role=status], h1, h2, h3", focusable);
    var where = heading || focusable;
    if (!where.hasAttribute("tabindex") && !where.matches("a, button, input, select, textarea")) {
      where.setAttribute("tabindex", "-1");
    }
    where.focus({ preventScroll: false });
  });

  // --- the filter set a saved view and the bulk "Back to the queue" keep ------------------------
  var FILTERS = ["q", "customer", "connection", "message_type", "state", "category", "sla_status", "assignee"];

  function filterQuery() {
    var params = new URLSearchParams(window.location.search), out = new URLSearchParams();
    FILTERS.forEach(function (k) {
      params.getAll(k).forEach(function (v) { if (v.trim()) out.append(k, v.trim()); });
    });
    return out.toString();
  }

  function updateSavedQuery() {
    var input = $("[data-view-query]");
    if (input) input.value = filterQuery();
    var exp = $("a[data-export]");
    if (exp) {
      var q = filterQuery();
      exp.href = exp.href.split("?")[0] + (q ? "?" + q : "");
    }
  }

  document.addEventListener("submit", function (e) {
    var form = e.target;
    if (form.id === "bulk-form") {
      var back = $("input[data-back]", form);
      if (back) back.value = window.location.pathname + window.location.search;
    }
  }, true);
  window.addEventListener("popstate", updateSavedQuery);

  // --- wide screens open the filter and bulk panels; phones keep them folded -----------------------
  function openWide() {
    if (!window.matchMedia("(min-width: 900px)").matches) return;
    $all("details[data-wide-open]").forEach(function (d) { d.open = true; });
  }

  // --- keyboard shortcuts ------------------------------------------------------------------------
  function typing(el) {
    if (!el) return false;
    if (el.isContentEditable || /^(SELECT|TEXTAREA)$/.test(el.tagName)) return true;
    // A checkbox, radio or button takes no letters: shortcuts work while a row's box has focus.
    return el.tagName === "INPUT" && !/^(checkbox|radio|button|submit|reset)$/.test(el.type);
  }

  function rows() { return $all("tr[data-row]"); }

  function currentRow() {
    var el = document.activeElement;
    return el && el.closest ? el.closest("tr[data-row]") : null;
  }

  function moveRow(step) {
    var all = rows();
    if (!all.length) return;
    var at = all.indexOf(currentRow());
    var next = at < 0 ? (step > 0 ? 0 : all.length - 1) : Math.max(0, Math.min(all.length - 1, at + step));
    var link = $("[data-row-link]", all[next]);
    if (link) { link.focus(); link.scrollIntoView({ block: "nearest" }); }
  }

  function selectedCount() { return $all('input[name=ids][form="bulk-form"]:checked').length; }

  function bulkAction(action, label) {
    var form = document.getElementById("bulk-form");
    if (!form) return;
    if (!selectedCount()) {
      var row = currentRow();
      var box = row && $('input[name=ids]', row);
      if (box) { box.checked = true; document.dispatchEvent(new Event("change")); }
    }
    var n = selectedCount();
    if (!n) { announce("Select a row first: j and k move, x selects."); return; }
    var details = form.closest("details");
    if (details) details.open = true;
    $("[data-bulk-action]", form).value = action;
    if (action === "discard") {
      // A discard needs a reason code: let the person choose it, then review.
      var code = $("[data-bulk-reason-code]", form);
      announce("Discard " + n + ": choose a reason code, then Review bulk action.");
      if (code) code.focus();
      return;
    }
    // The confirmation page lists the exact rows before anything is applied.
    announce(label + " " + n + ": opening the confirmation.");
    if (form.requestSubmit) form.requestSubmit(); else form.submit();
  }

  // On an exception's page the same keys go to that action's form: its first field (or its
  // button) takes focus and nothing is sent until the person confirms with Enter or a click.
  function actionForm(actions) {
    for (var i = 0; i < actions.length; i++) {
      var form = $("form.action-" + actions[i]);
      if (!form) continue;
      var field = $("textarea, select, input:not([type=hidden])", form) || $("button[type=submit]", form);
      if (!field) continue;
      form.scrollIntoView({ block: "nearest" });
      field.focus();
      var button = $("button[type=submit]", form);
      announce((button ? button.textContent.trim() : actions[i]) + ": fill in the form, then confirm.");
      return true;
    }
    return false;
  }

  function showShortcuts() {
    var dialog = document.getElementById("shortcuts");
    if (dialog && dialog.showModal && !dialog.open) dialog.showModal();
  }

  document.addEventListener("click", function (e) {
    if (e.target.closest && e.target.closest("[data-shortcuts-open]")) showShortcuts();
  });

  document.addEventListener("keydown", function (e) {
    if (e.defaultPrevented || e.ctrlKey || e.metaKey || e.altKey || typing(e.target)) return;
    var dialog = document.getElementById("shortcuts");
    if (dialog && dialog.open) return;
    var onQueue = !!$("#queue-results");
    switch (e.key) {
      case "?": showShortcuts(); break;
      case "/": {
        var search = $("form.filters input[name=q]");
        if (!search) return;
        var details = search.closest("details");
        if (details) details.open = true;
        search.focus();
        break;
      }
      case "j": if (!onQueue) return; moveRow(1); break;
      case "k": if (!onQueue) return; moveRow(-1); break;
      case "o": {
        var row = currentRow();
        var link = row && $("[data-row-link]", row);
        if (!link) return;
        window.location.href = link.href;
        break;
      }
      case "x": {
        var r = currentRow();
        var box = r && $('input[name=ids]', r);
        if (!box) return;
        box.checked = !box.checked;
        document.dispatchEvent(new Event("change"));
        announce((box.checked ? "Selected " : "Unselected ") + "exception " + r.dataset.row + ", " + selectedCount() + " selected");
        break;
      }
      case "a": if (onQueue) bulkAction("claim", "Claim"); else if (!actionForm(["approve", "claim"])) return; break;
      case "r": if (onQueue) bulkAction("resubmit", "Resubmit"); else if (!actionForm(["resubmit"])) return; break;
      case "d": if (onQueue) bulkAction("discard", "Discard"); else if (!actionForm(["discard"])) return; break;
      case "e": if (onQueue) bulkAction("escalate", "Escalate"); else if (!actionForm(["escalate"])) return; break;
      default: return;
    }
    e.preventDefault();
  });

  // --- code blocks scroll by keyboard --------------------------------------------------------------
  function scrollableBlocks(root) {
    $all("pre", root || document).forEach(function (pre) {
      if (pre.hasAttribute("tabindex")) return;
      if (pre.scrollWidth > pre.clientWidth + 1 || pre.scrollHeight > pre.clientHeight + 1) {
        pre.setAttribute("tabindex", "0");
        if (!pre.hasAttribute("role")) pre.setAttribute("role", "region");
        if (!pre.hasAttribute("aria-label") && !pre.hasAttribute("aria-labelledby")) {
          pre.setAttribute("aria-label", pre.dataset.label || "Code, scrollable");
        }
      }
    });
  }

  document.addEventListener("htmx:afterSettle", function (e) { scrollableBlocks(e.detail.target); });
  document.addEventListener("DOMContentLoaded", function () {
    openWide();
    updateSavedQuery();
    scrollableBlocks();
  });
})();
