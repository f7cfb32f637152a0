// OpenMeter's own JavaScript SDK against Tally, as an OpenMeter user's code calls it.
// Run by tests/it/openmeter.rs with TALLY_URL and TALLY_KEY set:
//
//   node client.mjs ingest   sends the workload below (one batch twice, as a retry does)
//   node client.mjs query    defines a meter, queries it, reads an entitlement value
//
// Each phase prints one JSON object: what the SDK returned, for the test to compare with
// its own computation over the lake.
import { OpenMeter } from '@openmeter/sdk'

const om = new OpenMeter({ baseUrl: process.env.TALLY_URL, apiKey: process.env.TALLY_KEY })

/** The workload: 3 customers, 4 days, every 97 minutes, two models, tokens as text. */
function events() {
  const out = []
  const start = Date.parse('2026-11-10T00:00:00Z')
  for (let i = 0; i < 600; i++) {
    out.push({
      id: `om-${i}`,
      source: 'openmeter-sdk-test',
      type: 'prompt',
      subject: `c${(i % 3) + 1}`,
      time: new Date(start + i * 97 * 60 * 1000 / 10),
      data: { tokens: String(((i * 37) % 500) + 1), model: i % 4 === 0 ? 'claude' : 'gpt-4o' },
    })
  }
  return out
}

async function ingest() {
  const all = events()
  for (let i = 0; i < all.length; i += 100) {
    await om.events.ingest(all.slice(i, i + 100))
  }
  // A client retrying a batch it is unsure went through: the same ids, counted once.
  await om.events.ingest(all.slice(100, 200))
  return { sent: all.length }
}

async function query() {
  const created = await om.meters.create({
    slug: 'tokens',
    name: 'Tokens',
    eventType: 'prompt',
    aggregation: 'SUM',
    valueProperty: '$.tokens',
    groupBy: { model: '$.model' },
  })
  const got = await om.meters.get('tokens')
  const listed = await om.meters.list()
  const byCustomer = await om.meters.query('tokens', { groupBy: ['subject'] })
  const byDay = await om.meters.query('tokens', {
    subject: ['c1'],
    windowSize: 'DAY',
    windowTimeZone: 'America/New_York',
  })
  const byModel = await om.meters.query('tokens', { groupBy: ['model'] })
  const claudeOfC2 = await om.meters.queryPost('tokens', {
    filterCustomerId: ['c2'],
    filterGroupBy: { model: ['claude'] },
  })
  // Now (no usage this month), and in the workload's month.
  const value = await om.customers.entitlementsV1.value('c1', 'prompt')
  const valueV2 = await om.customers.entitlements.value('c1', 'prompt', {
    query: { time: new Date('2026-11-20T00:00:00Z') },
  })
  return { created, got, listed, byCustomer, byDay, byModel, claudeOfC2, value, valueV2 }
}

const phases = { ingest, query }
const phase = phases[process.argv[2]]
if (!phase) {
  console.error(`usage: node client.mjs ${Object.keys(phases).join('|')}`)
  process.exit(2)
}
try {
  console.log(JSON.stringify(await phase()))
} catch (e) {
  console.error(`${e.name}: ${e.message}`, e.problem ?? e.response?.status ?? '')
  process.exit(1)
}
