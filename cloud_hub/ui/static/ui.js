// The fleet page's live parts: the hub sends each part as HTML (rendered and escaped by its templates)
// over server-sent events, only when it changed. No framework, nothing fetched from elsewhere.
"use strict";
(function () {
  const live = document.getElementById("live");
  const parts = ["summary", "fleet", "requests", "plots"];
  const events = new EventSource("/ui/events");
  for (const name of parts) {
    events.addEventListener(name, (e) => {
      const target = document.getElementById(name);
      // an operator halfway through "Revoke…" keeps the row they opened
      if (target && !(name === "fleet" && target.querySelector("details[open]"))) {
        target.innerHTML = e.data;
      }
    });
  }
  events.addEventListener("open", () => { live.textContent = "live"; live.className = "live on"; });
  events.addEventListener("error", () => {
    if (events.readyState === EventSource.CLOSED) {  // refused (logged out, session expired): log in again
      live.textContent = "disconnected"; live.className = "live off";
      window.location.assign("/ui/login");
    } else {
      live.textContent = "reconnecting…"; live.className = "live off";
    }
  });
  events.addEventListener("bye", () => { events.close(); window.location.assign("/ui/login"); });
})();
