// Workers-style script (service-worker syntax): rewrite headers, then on to the upstream.
addEventListener("fetch", (event) => {
  const headers = event.request.headers;
  headers.delete("x-internal-debug");
  if (headers.has("x-user")) {
    headers.set("x-shop-user", headers.get("x-user"));
    headers.delete("x-user");
  }
  headers.set("x-request-uuid", crypto.randomUUID());
  // no event.respondWith(...): the (edited) request goes on to the route's upstream
});
