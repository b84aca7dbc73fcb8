// JSON bodies in both directions (the filter's configuration sets buffer_request_body and
// buffer_response_body, so request.json() and response.json() have the whole body).
export async function onRequest(request) {
  if (request.method !== "POST" || !request.headers.get("content-type")?.startsWith("application/json")) return;
  let data;
  try {
    data = await request.json();
  } catch {
    return Response.json({ error: "invalid_json" }, { status: 400 });
  }
  delete data.password; // never forward it
  data.received_at = new Date().toISOString();
  return new Request(request, { body: JSON.stringify(data) });
}

export async function onResponse(response) {
  if (!response.headers.get("content-type")?.startsWith("application/json")) return;
  const data = await response.json();
  return Response.json({ data, served_by: "edge" }, { status: response.status, headers: response.headers });
}
