// A health endpoint that asks the upstream itself (fetch goes to the upstream named by the URL's host).
export async function onRequest(request) {
  if (new URL(request.url).pathname !== "/edge/health") return;
  const started = Date.now();
  try {
    const probe = await fetch("http://origin/healthz", { timeout: 2000 });
    const healthy = probe.ok;
    return Response.json(
      { status: healthy ? "ok" : "degraded", upstream: probe.status, ms: Date.now() - started },
      { status: healthy ? 200 : 503, headers: { "cache-control": "no-store" } },
    );
  } catch (e) {
    return Response.json({ status: "down", error: String(e.message) }, { status: 503 });
  }
}
