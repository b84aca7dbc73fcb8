// Express answering the small JSON itself (the Node.js peer of a JS edge function that answers locally);
// every other path is proxied to the origin like express_proxy.js, so all workloads run.
//   NODE_PATH=benchmarks/.work/node/node_modules node benchmarks/peers/express_edge.js PORT http://127.0.0.1:ORIGIN BODY
'use strict';
const http = require('http');
const express = require('express');
const { createProxyMiddleware } = require('http-proxy-middleware');

const [port, target, body] = process.argv.slice(2);
if (!port || !target || !body) {
  console.error('usage: express_edge.js PORT TARGET_URL JSON_BODY');
  process.exit(2);
}
const agent = new http.Agent({ keepAlive: true, maxSockets: 512, maxFreeSockets: 512 });
const app = express();
app.disable('x-powered-by');
app.disable('etag');
app.get('/json', (req, res) => res.type('application/json').send(body));
app.use(createProxyMiddleware({ target, changeOrigin: false, xfwd: true, agent }));
const server = app.listen(Number(port), '127.0.0.1');
server.keepAliveTimeout = 60000;
