// Opens the dashboard in Debian's headless Chromium, as a user would, and
// checks what is on screen. Run by tests/dashboard_browser.rs:
//
//   node dashboard.mjs URL SCREENSHOT.png POLICY DRAIN_SWITCH
//
// It prints LOADED once the first page is checked; the caller then applies
// POLICY (Kind/name) with the CLI, and the page must show it by itself
// (the refresh script), without a reload. Then it fails inventory-west's
// health check (creating DRAIN_SWITCH, the file whose existence fails it)
// and times how long the page takes to show it. Every request the page
// makes must stay on the dashboard's own origin: nothing from a CDN or
// anywhere else.
import fs from 'node:fs';
import path from 'node:path';
import { chromium } from 'playwright-core';

const [url, shot, policy, drain] = process.argv.slice(2);
if (!url || !shot || !policy || !drain) {
  console.error('usage: node dashboard.mjs URL SCREENSHOT.png KIND/NAME DRAIN_SWITCH');
  process.exit(64);
}
const origin = new URL(url).origin;

function check(cond, what) {
  if (!cond) throw new Error(what);
}

const browser = await chromium.launch({
  executablePath: '/usr/bin/chromium',
  headless: true,
  args: [
    '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync',
  ],
});
try {
  const page = await browser.newPage({ viewport: { width: 1400, height: 1000 } });
  const requests = [];
  page.on('request', (r) => requests.push(r.url()));
  const problems = [];
  page.on('pageerror', (e) => problems.push(`page error: ${e}`));
  page.on('console', (m) => {
    if (m.type() === 'error') problems.push(`console error: ${m.text()}`);
  });

  await page.goto(url, { waitUntil: 'load' });
  // The token is traded for a cookie and leaves the address bar.
  check(page.url() === `${origin}/`, `address after sign-in: ${page.url()}`);
  await page.waitForSelector('#b-zones table', { timeout: 15000 });

  const zones = await page.locator('#s-zones').innerText();
  for (const z of ['east', 'west', 'edge', 'leader']) {
    check(zones.includes(z), `zones section lacks ${z}: ${zones}`);
  }
  const services = await page.locator('#s-services').innerText();
  for (const s of ['frontend.shop', 'auth.shop', 'catalog.shop', 'inventory.shop']) {
    check(services.includes(s), `services section lacks ${s}: ${services}`);
  }
  check(/catalog\.shop\s+— 2 endpoint\(s\), 2 healthy/.test(services), `catalog endpoints: ${services}`);
  const proxyRows = page.locator('#b-proxies tbody tr');
  const rows = await proxyRows.count();
  check(rows === 8, `proxies table: ${rows} rows`);
  const proxies = await page.locator('#b-proxies tbody').innerText();
  check((proxies.match(/in sync/g) || []).length === 8, `proxies not all in sync: ${proxies}`);
  check(await page.locator('#b-graph svg').isVisible(), 'no service graph drawn');
  // dev's own traffic down the chain: the four shop services across the
  // zones, each hop an edge with live requests/s and success. Proxies are
  // in sync as soon as they acknowledge, which can be before their first
  // golden-signal report (every 2 s): the page, refreshing each second,
  // gets 15 s to show every edge.
  const hops = [
    ['frontend', 'east', 'auth', 'east'],
    ['auth', 'east', 'catalog', 'west'],
    ['catalog', 'west', 'inventory', 'west'],
  ];
  const live = (graph) => hops.filter(([from, fz, to, tz]) => {
    const re = new RegExp(`${from}\\.shop \\(${fz}\\)\\t${to}\\.shop \\(${tz}\\)\\t[^\\t]+\\t([0-9.]+)\\t([0-9.]+)%`);
    const m = graph.match(re);
    return m && Number(m[1]) > 0 && Number(m[2]) > 0;
  }).length;
  let graph = await page.locator('#s-graph').innerText();
  for (let i = 0; i < 30 && live(graph) < hops.length; i++) {
    await page.waitForTimeout(500);
    graph = await page.locator('#s-graph').innerText();
  }
  check(live(graph) === hops.length, `not every hop is a live edge: ${graph}`);
  check(await page.locator('#b-graph svg line.edge').count() >= 3, 'edges not drawn');
  check(!(await page.locator(`[data-policy="${policy}"]`).count()), `${policy} is there already`);

  let navigations = 0;
  page.on('framenavigated', (f) => {
    if (f === page.mainFrame()) navigations += 1;
  });
  console.log('LOADED');

  // The caller applies the policy now; the refresh must bring it in.
  const row = page.locator(`[data-policy="${policy}"]`);
  await row.waitFor({ state: 'visible', timeout: 30000 });
  check(navigations === 0, `the page navigated ${navigations} time(s) instead of refreshing`);
  const [kind, name] = policy.split('/');
  const rowText = await row.innerText();
  check(rowText.includes(kind) && rowText.includes(name) && rowText.includes('no proxy'), `policy row: ${rowText}`);
  const audit = await page.locator('#b-audit tbody tr').first().innerText();
  check(audit.includes('policy.apply') && audit.includes(policy), `newest audit entry: ${audit}`);
  const updated = await page.locator('#updated').innerText();
  check(updated.startsWith('read '), `status line: ${updated}`);

  // A failed health check shows without a reload: the agent checks every
  // second and writes the change to the store at once; the page refreshes
  // every second. By design that is at most about 2 s plus the write, so a
  // 2 s bound fails on the two timers' phase alone (2315 ms seen in CI,
  // 823 ms another time); the bound is 5 s and the figure is printed.
  fs.mkdirSync(path.dirname(drain), { recursive: true });
  const failedAt = Date.now();
  fs.writeFileSync(drain, '');
  let healthMs;
  try {
    await page
      .locator('tbody[data-service="inventory.shop"][data-healthy="1"]')
      .waitFor({ state: 'attached', timeout: 15000 });
    healthMs = Date.now() - failedAt;
  } finally {
    fs.unlinkSync(drain);
  }
  const inv = await page.locator('tbody[data-service="inventory.shop"]').innerText();
  check(/inventory-west[^\n]*unhealthy/.test(inv), `inventory rows: ${inv}`);
  console.log(`HEALTH_MS ${healthMs}`);
  check(healthMs <= 5000, `the failed health check took ${healthMs} ms to show`);

  await page.screenshot({ path: shot, fullPage: true });

  const foreign = requests.filter((u) => !u.startsWith(`${origin}/`));
  check(foreign.length === 0, `requests left the dashboard: ${foreign.join(', ')}`);
  check(problems.length === 0, problems.join('\n'));
  console.log(JSON.stringify({ requests: requests.length, newest_audit: audit, health_shown_ms: healthMs }));
} finally {
  await browser.close();
}
