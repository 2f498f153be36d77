// Reconciliation Console: small enhancements. Nothing here is needed for any action to work.
(function () {
  "use strict";
  var AT_RISK_FRACTION = 0.25; // keep in step with app/domain/sla.py

  function pad(n) { return (n < 10 ? "0" : "") + n; }

  // Mirror of app.domain.sla.format_remaining.
  function formatRemaining(ms) {
    var seconds = Math.trunc(ms / 1000);
    var span = Math.abs(seconds);
    var h = Math.floor(span / 3600), m = Math.floor((span % 3600) / 60), s = span % 60;
    var text = h ? h + "h " + pad(m) + "m" : m + "m " + pad(s) + "s";
    return seconds > 0 ? text + " left" : "breached " + text + " ago";
  }

  // Mirror of app.domain.sla.sla_status.
  function slaStatus(now, start, due) {
    if (now >= due) return "breached";
    var total = due - start, left = due - now;
    return total <= 0 || left / total < AT_RISK_FRACTION ? "at_risk" : "on_track";
  }

  function tick() {
    var now = Date.now();
    document.querySelectorAll(".sla[data-due]").forEach(function (el) {
      var due = Date.parse(el.dataset.due), start = Date.parse(el.dataset.start);
      if (isNaN(due) || isNaN(start)) return;
      var status = slaStatus(now, start, due);
      var remaining = el.querySelector(".sla-remaining"), label = el.querySelector(".sla-status");
      if (remaining) remaining.textContent = formatRemaining(due - now);
      if (label) label.textContent = status.replace("_", " ");
      if (!el.classList.contains("sla-" + status)) {
        el.classList.remove("sla-on_track", "sla-at_risk", "sla-breached");
        el.classList.add("sla-" + status);
      }
    });
  }

  // Bulk selection: show the exact number of selected rows.
  function updateBulkCount() {
    var form = document.getElementById("bulk-form");
    if (!form) return;
    var boxes = document.querySelectorAll('input[type=checkbox][name=ids][form="bulk-form"]');
    var n = 0;
    boxes.forEach(function (b) { if (b.checked) n++; });
    document.querySelectorAll("[data-bulk-count]").forEach(function (el) {
      el.textContent = n + " selected";
    });
    var all = document.querySelector("[data-select-all]");
    if (all) {
      all.checked = boxes.length > 0 && n === boxes.length;
      all.indeterminate = n > 0 && n < boxes.length;
    }
  }

  document.addEventListener("change", function (e) {
    var t = e.target;
    if (t.matches && t.matches("[data-select-all]")) {
      document.querySelectorAll('input[type=checkbox][name=ids][form="bulk-form"]').forEach(function (b) {
        b.checked = t.checked;
      });
    }
    updateBulkCount();
  });

  document.addEventListener("submit", function (e) {
    var form = e.target;
    if (form.id === "bulk-form") {
      var n = document.querySelectorAll('input[type=checkbox][name=ids][form="bulk-form"]:checked').length;
      if (n === 0) {
        e.preventDefault();
        document.querySelectorAll("[data-bulk-count]").forEach(function (el) {
          el.textContent = "0 selected — select at least one exception";
        });
      }
    }
  });

  // Correction editor: a "jump to" link selects its line (or field) in the textarea and scrolls
  // it into view. Without this script the link still goes to the editor (href="#payload").
  function jumpTo(link) {
    var editor = document.querySelector(link.getAttribute("href"));
    if (!editor || editor.tagName !== "TEXTAREA") return false;
    var line = parseInt(link.dataset.jumpLine, 10);
    if (!(line > 0)) return false;
    var lines = editor.value.split("\n");
    line = Math.min(line, lines.length);
    var offset = 0;
    for (var i = 0; i < line - 1; i++) offset += lines[i].length + 1;
    var text = lines[line - 1];
    var start = parseInt(link.dataset.jumpStart, 10) || 0, end = parseInt(link.dataset.jumpEnd, 10) || 0;
    if (!(end > start) || end > text.length) { start = 0; end = text.length; }
    editor.focus({ preventScroll: true });
    editor.setSelectionRange(offset + start, offset + end);
    var style = getComputedStyle(editor);
    var lineHeight = parseFloat(style.lineHeight) || parseFloat(style.fontSize) * 1.2;
    // The target line a third of the way down, so the lines above it stay readable.
    editor.scrollTop = Math.max(0, (line - 1) * lineHeight - editor.clientHeight / 3);
    editor.scrollIntoView({ block: "nearest" });
    return true;
  }

  document.addEventListener("click", function (e) {
    var link = e.target.closest && e.target.closest("a[data-jump-line]");
    if (link && jumpTo(link)) e.preventDefault();
  });

  document.addEventListener("htmx:afterSwap", function () { updateBulkCount(); tick(); });
  document.addEventListener("DOMContentLoaded", function () { updateBulkCount(); tick(); setInterval(tick, 1000); });
})();
