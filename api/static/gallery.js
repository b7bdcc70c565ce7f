// Gallery pages: choosing a file submits it; a photo dropped anywhere on the page, or pasted, is searched too; very wide
// or tall pictures are shown whole on their cards.
(function () {
  "use strict";

  // A refused upload is answered at the upload's own address: a reload would send the file again ("Confirm Form
  // Resubmission"), so the address shown becomes the home page's.
  var refused = document.querySelector("[data-replace-url]");
  if (refused && window.history.replaceState) { window.history.replaceState(null, "", refused.getAttribute("data-replace-url")); }

  // A card crops its thumbnail to a square: a panorama or a tall strip (10:1) would show a blown-up sliver of its
  // middle. Such pictures are shown whole in the square instead.
  var WHOLE_BEYOND = 2.5;
  function fitThumbnail(img) {
    if (!img.naturalWidth || !img.naturalHeight) { return; }
    var ratio = img.naturalWidth / img.naturalHeight;
    if (ratio > WHOLE_BEYOND || ratio < 1 / WHOLE_BEYOND) { img.classList.add("whole"); }
  }
  document.addEventListener("load", function (event) {   // images do not bubble load: caught on the way down
    if (event.target.tagName === "IMG" && event.target.closest(".thumb")) { fitThumbnail(event.target); }
  }, true);
  Array.prototype.forEach.call(document.querySelectorAll(".thumb img"), function (img) {
    if (img.complete) { fitThumbnail(img); }   // loaded before this script ran
  });

  // A page still computing (/evaluation, /duplicates) asks again every few seconds and shows the answer in place when
  // it is ready. It reloaded itself instead (an HTTP Refresh), taking focus, scroll and a screen reader's place
  // every 2-3 s, and cancelling a link followed at that moment.
  var computing = document.getElementById("computing");
  if (computing && computing.getAttribute("data-poll-s") && window.fetch && window.DOMParser) {
    var every = 1000 * Number(computing.getAttribute("data-poll-s"));
    var again = function () {   // less and less often while it lasts (each look holds a server thread a moment)
      every = Math.min(every * 1.5, 30000);
      window.setTimeout(poll, every);
    };
    var poll = function () {
      window.fetch(window.location.href, {credentials: "same-origin"})
        .then(function (response) {
          if (!response.ok) { again(); return; }   // a restart's 503: asked again, the page kept
          return response.text().then(function (text) {
            var fresh = new DOMParser().parseFromString(text, "text/html");
            var main = fresh.querySelector("main");
            if (!main || fresh.getElementById("computing")) { again(); return; }
            var page = document.querySelector("main");
            var focused = page.contains(document.activeElement);
            page.innerHTML = main.innerHTML;
            document.title = fresh.title;
            if (focused) { page.focus(); }   // focus was in what was replaced: kept in the page, not dropped to <body>
          });
        }, again);
    };
    window.setTimeout(poll, every);
  }

  var forms = Array.prototype.slice.call(document.querySelectorAll("form[data-upload]"));
  if (!forms.length) { return; }
  var primary = document.querySelector("form[data-upload][data-primary]") || forms[0];

  function busy(form, on) {
    form.classList.toggle("busy", on);
    form.setAttribute("aria-busy", on ? "true" : "false");
    var note = form.querySelector(".busy-note");
    if (note) { note.textContent = on ? "Searching…" : ""; }   // a live region announces text put into it
    document.body.classList.toggle("searching", on);
  }

  function showError(form, message) {
    var box = form.querySelector(".form-error");
    form.querySelector("input[type=file]").value = "";   // choosing the same file again is a change again
    if (!box) { window.alert(message); return; }
    box.textContent = "";   // the same message again is announced again: emptied, then filled on the next frame
    box.hidden = false;
    window.requestAnimationFrame(function () { box.textContent = message; });
  }

  function hideErrors() {
    forms.forEach(function (form) {
      var box = form.querySelector(".topbar-error");   // the top bar's floats over the page: it goes when done with
      if (box && !box.hidden) { box.hidden = true; }
    });
  }
  document.addEventListener("keydown", function (event) { if (event.key === "Escape") { hideErrors(); } });
  document.addEventListener("click", function (event) {
    if (!event.target.closest(".topbar-upload")) { hideErrors(); }
  });

  // Sent by fetch where there is one: a refusal (not an image after all, too many pixels, the server busy) is shown
  // in place, where the person was, focus kept; a form post answered it with the home page, scrolled to the top.
  function post(form) {
    if (!window.fetch || !window.FormData) { form.submit(); return; }
    window.fetch(form.action, {method: "POST", body: new FormData(form), headers: {"X-Requested-With": "fetch"},
                               credentials: "same-origin"})
      .then(function (response) {
        return response.json().then(function (body) { return {ok: response.ok, body: body}; }, function () {
          // not the server's own answer (a proxy's page): said by its status
          var message = response.status === 413 ? "That photo is larger than the server accepts." :
            response.status >= 500 ? "The server could not answer (" + response.status + "); try again in a moment." :
            "The upload was refused (" + response.status + ").";
          return {ok: false, body: {error: {message: message}}};
        });
      })
      .then(function (answer) {
        if (answer.ok && answer.body.url) { window.location.assign(answer.body.url); return; }
        busy(form, false);
        showError(form, answer.body.error ? answer.body.error.message : "The search failed; try again.");
      }, function () {
        busy(form, false);
        showError(form, "The photo did not reach the server (is it still running? is the network up?); try again.");
      });
  }

  function send(form, file) {
    if (!file || document.body.classList.contains("searching")) { return; }   // one upload at a time
    if (file.type && file.type.indexOf("image/") !== 0) {
      showError(form, "“" + file.name + "” is not an image.");
      return;
    }
    var limit = Number(form.getAttribute("data-max-bytes") || 0);
    if (limit && file.size > limit) {
      showError(form, "That photo is larger than the " + Math.round(limit / 1048576) + " MB upload limit.");
      return;
    }
    var input = form.querySelector("input[type=file]");
    if (input.files[0] !== file) {
      var transfer = new DataTransfer();
      transfer.items.add(file);
      input.files = transfer.files;
    }
    hideErrors();
    busy(form, true);
    post(form);
  }

  forms.forEach(function (form) {
    var input = form.querySelector("input[type=file]");
    input.addEventListener("change", function () { send(form, input.files[0]); });
    // The label looks like a button: Enter opens the file chooser as Space does (Chromium opened it on Space only)
    input.addEventListener("keydown", function (event) {
      if (event.key === "Enter") { event.preventDefault(); input.click(); }
    });
  });

  function carriesFiles(event) {
    var types = event.dataTransfer && event.dataTransfer.types;
    return !!types && Array.prototype.indexOf.call(types, "Files") !== -1;
  }
  var depth = 0;
  document.addEventListener("dragenter", function (event) {
    if (!carriesFiles(event)) { return; }
    depth += 1;
    document.body.classList.add("dragging");
  });
  document.addEventListener("dragleave", function (event) {
    if (!carriesFiles(event)) { return; }
    depth = Math.max(0, depth - 1);
    if (depth === 0) { document.body.classList.remove("dragging"); }
  });
  document.addEventListener("dragover", function (event) {
    if (carriesFiles(event)) { event.preventDefault(); event.dataTransfer.dropEffect = "copy"; }
  });
  document.addEventListener("drop", function (event) {
    if (!carriesFiles(event)) { return; }
    event.preventDefault();
    depth = 0;
    document.body.classList.remove("dragging");
    send(primary, event.dataTransfer.files[0]);
  });

  document.addEventListener("paste", function (event) {
    var files = event.clipboardData ? event.clipboardData.files : [];
    for (var i = 0; i < files.length; i += 1) {
      if (files[i].type.indexOf("image/") === 0) { send(primary, files[i]); return; }
    }
  });

  // Back from a results page: the page may come from the back/forward cache with the busy state still on.
  // Its file input still holds the file sent, and choosing that file again would not be a change: emptied.
  window.addEventListener("pageshow", function () {
    forms.forEach(function (form) {
      busy(form, false);
      form.querySelector("input[type=file]").value = "";
    });
  });
})();
