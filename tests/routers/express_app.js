// Wacrm's route table on Express 4's own router.  Usage: node express_app.js ROUTES_JSON PORT
// where ROUTES_JSON is [[method, template], ...]; Express comes from NODE_PATH.
"use strict";
const express = require("express");

const [table, port] = process.argv.slice(2);
const answer = (route, method) => ({ upstream: "express", route, method });
const missing = (status) => ({ upstream: "express", route: null, status });

const app = express();
const methods = new Map();
for (const [method, template] of JSON.parse(table)) {
  methods.set(template, [...(methods.get(template) || []), method]);
}
for (const [template, allowed] of methods) {
  const route = app.route(template.replace(/\{(\w+)\}/g, ":$1"));
  for (const method of allowed) {
    route[method.toLowerCase()]((req, res) => res.json(answer(template, method)));
  }
  route.all((req, res) => res.status(405).json(missing(405)));
}
app.use((req, res) => res.status(404).json(missing(404)));
// Express's own errors, such as a parameter that does not percent-decode (400).
app.use((err, req, res, next) => {
  const status = err.status || 500;
  res.status(status).json(missing(status));
});
app.listen(Number(port), "127.0.0.1");
