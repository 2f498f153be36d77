// Approvals work queue (templates/approvals/): after the review panel is swapped in, focus goes
// where the user must look next — the error of a refused decision, else the item's heading (the
// next item after a decision, or "Queue empty") — and the list marks the item under review.
// Without this script every link and form still works as a full page.
(function () {
  "use strict";

  function panel() { return document.getElementById("review-panel"); }

  function markCurrent() {
    var p = panel();
    if (!p) return;
    var article = p.querySelector("[data-exception-id]");
    var id = article ? article.getAttribute("data-exception-id") : null;
    document.querySelectorAll("#approval-list tr[id^='approval-row-']").forEach(function (row) {
      var current = id !== null && row.id === "approval-row-" + id;
      row.classList.toggle("current", current);
      if (current) row.setAttribute("aria-current", "true"); else row.removeAttribute("aria-current");
    });
  }

  function focusPanel() {
    var p = panel();
    if (!p) return;
    var target = p.querySelector("[data-focus]") || p.querySelector("#review-h");
    if (target) {
      target.focus({ preventScroll: true });
      target.scrollIntoView({ block: "nearest" });
    }
  }

  // A failure htmx does not swap (a 5xx, or no answer at all) is still said inside the panel.
  function showFailure(text) {
    var p = panel();
    if (!p) return;
    var note = p.querySelector("[data-request-failed]");
    if (!note) {
      note = document.createElement("p");
      note.className = "flash flash-error";
      note.setAttribute("role", "alert");
      note.setAttribute("tabindex", "-1");
      note.setAttribute("data-request-failed", "");
      p.insertBefore(note, p.firstChild);
    }
    note.textContent = text;
    note.focus();
  }

  document.addEventListener("htmx:afterSwap", function (e) {
    if (e.detail && e.detail.target && e.detail.target.id === "review-panel") {
      markCurrent();
      focusPanel();
    }
  });
  document.addEventListener("htmx:responseError", function (e) {
    if (e.detail && e.detail.target && e.detail.target.closest && e.detail.target.closest("#review-panel")) {
      showFailure("The server could not complete this (HTTP " + e.detail.xhr.status + "). Reload the item to see its current state.");
    }
  });
  document.addEventListener("htmx:sendError", function (e) {
    if (e.detail && e.detail.target && e.detail.target.closest && e.detail.target.closest("#review-panel")) {
      showFailure("The server could not be reached. Check the connection and try again.");
    }
  });
  document.addEventListener("DOMContentLoaded", function () {
    var p = panel();
    // Opened by its link (a full page): the panel is what the user came for.
    if (p && p.querySelector("[data-exception-id], [data-focus]")) focusPanel();
    markCurrent();
  });
})();
