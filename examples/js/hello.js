// A JSON answer from the edge: the upstream is never called for /api/hello.
export async function onRequest(request, ctx) {
  const url = new URL(request.url);
  if (url.pathname === "/api/hello")
    return Response.json({ message: "hello from the edge", region: ctx.env.EDGE_REGION ?? "unknown" });
  request.headers.set("x-edge", "js"); // everything else goes on to the upstream, marked
}

export async function onResponse(response, request, ctx) {
  response.headers.set("x-served-by", "js");
}
