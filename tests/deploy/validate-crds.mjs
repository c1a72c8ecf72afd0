// Validate custom resources against their CRDs' published OpenAPI schemas, as the
// @kubernetes-models packages (Gateway API, Envoy Gateway, Traefik) generate them.
//
// Usage: node validate-crds.mjs [FILE...]   (no FILE: read standard input)
// Each file holds YAML documents, as `kubectl kustomize` renders them. Prints one JSON array,
// one entry per document: {apiVersion, kind, namespace, name, model, errors}, where model is
// false when no package has a model of that apiVersion and kind (a core kind, or one that
// would go unchecked) and errors lists the schema's complaints (none where it holds). Exits 0
// when every document with a model validates, 1 when one does not, 2 on bad input.
// The packages are read from DEPLOY_SCHEMAS_MODULES, else .venv/deploy-schemas/node_modules,
// where scripts/bootstrap --test installs tests/deploy/package-lock.json.

import { readFileSync } from "node:fs";
import { createRequire } from "node:module";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), "..", "..");
const MODULES = resolve(
  process.env.DEPLOY_SCHEMAS_MODULES ?? join(ROOT, ".venv", "deploy-schemas", "node_modules"),
);
// The model packages: the @kubernetes-models dependencies of this folder's package.json.
const PACKAGES = Object.keys(
  JSON.parse(readFileSync(join(ROOT, "tests", "deploy", "package.json"), "utf8")).dependencies,
).filter((name) => name.startsWith("@kubernetes-models/"));

// Every model class in the packages' namespaces, by "apiVersion kind".
async function models() {
  const found = new Map();
  const seen = new Set();
  const walk = (namespace) => {
    if (seen.has(namespace)) return;
    seen.add(namespace);
    for (const value of Object.values(namespace)) {
      if (typeof value === "function") {
        const { apiVersion, kind } = value;
        if (typeof apiVersion === "string" && typeof kind === "string") {
          found.set(`${apiVersion} ${kind}`, value);
        }
      } else if (value !== null && typeof value === "object") {
        walk(value);
      }
    }
  };
  for (const name of PACKAGES) {
    walk(await import(pathToFileURL(join(MODULES, name, "index.js")).href));
  }
  return found;
}

function check(Model, doc) {
  try {
    new Model(doc).validate();
    return [];
  } catch (error) {
    if (!Array.isArray(error.errors)) throw error;
    const messages = error.errors.map((e) => {
      const extra = e.params?.allowedValues ? ` (${e.params.allowedValues.join(", ")})` : "";
      return `${e.instancePath || "(root)"}: ${e.message}${extra}`;
    });
    return [...new Set(messages)];
  }
}

function main(args) {
  const YAML = createRequire(join(dirname(MODULES), "resolve.js"))("yaml");
  const texts = args.length ? args.map((f) => readFileSync(f, "utf8")) : [readFileSync(0, "utf8")];
  const docs = [];
  for (const text of texts) {
    for (const parsed of YAML.parseAllDocuments(text)) {
      if (parsed.errors.length) {
        console.error(`validate-crds: ${parsed.errors[0].message}`);
        process.exit(2);
      }
      const doc = parsed.toJS();
      if (doc !== null) docs.push(doc);
    }
  }
  return models().then((found) => {
    let ok = true;
    const results = docs.map((doc) => {
      const Model = found.get(`${doc.apiVersion} ${doc.kind}`);
      const errors = Model ? check(Model, doc) : [];
      ok &&= errors.length === 0;
      return {
        apiVersion: doc.apiVersion,
        kind: doc.kind,
        namespace: doc.metadata?.namespace ?? null,
        name: doc.metadata?.name ?? null,
        model: Model !== undefined,
        errors,
      };
    });
    console.log(JSON.stringify(results));
    process.exitCode = ok ? 0 : 1;
  });
}

await main(process.argv.slice(2));
