// Express 5 + http-proxy-middleware 3: the Node.js peer. Keep-alive agent to the origin (as nginx has with
// `keepalive`), X-Forwarded-* added (as the gateway does).
//   NODE_PATH=benchmarks/.work/node/node_modules node benchmarks/peers/express_proxy.js PORT http://127.0.0.1:ORIGIN
'use strict';
const http = require('http');
const express = require('express');
const { createProxyMiddleware } = require('http-proxy-middleware');

const [port, target] = process.argv.slice(2);
if (!port || !target) {
  console.error('usage: express_proxy.js PORT TARGET_URL');
  process.exit(2);
}
const agent = new http.Agent({ keepAlive: true, maxSockets: 512, maxFreeSockets: 512 });
const app = express();
app.disable('x-powered-by');
app.use(createProxyMiddleware({ target, changeOrigin: false, xfwd: true, agent }));
const server = app.listen(Number(port), '127.0.0.1');
server.keepAliveTimeout = 60000;
