// The service worker of tests/test_firefox.py: every push event's payload goes to the sink.
"use strict";

self.addEventListener("install", () => self.skipWaiting());
self.addEventListener("activate", (event) => event.waitUntil(self.clients.claim()));

self.addEventListener("push", (event) => {
  const body = event.data ? event.data.text() : "<no data>";
  event.waitUntil(fetch("/received", { method: "POST", body }));
});

self.addEventListener("pushsubscriptionchange", (event) => {
  // Firefox drops a subscription when the server hands it a new UAID: say so.
  event.waitUntil(
    fetch("/report", { method: "POST", body: "pushsubscriptionchange" }),
  );
});
