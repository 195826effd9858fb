// Checks Grafana dashboard JSON files against Grafana's own code:
//   - the types of @grafana/schema, with TypeScript's compiler: each dashboard becomes one .ts file,
//     `<dashboard> satisfies GrafanaDashboard`, in which every panel is `<panel> satisfies TypedPanel<…>` with
//     its plugin's `Options` and `FieldConfig` from the same package;
//   - every unit against Grafana's unit registry (@grafana/data's value formats, the list Grafana's unit picker
//     shows and its formatter resolves);
//   - every panel, target and query variable against the dashboard's Prometheus data source variable.
// Each problem is reported as `<file>: panel <id> "<title>" (<type>): <field>: <what is wrong>`.
//
//   node check.mjs DASHBOARD_DIR OUT_DIR      (run from the folder holding node_modules; see ../typecheck.sh)
import { createRequire } from 'node:module';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

import ts from 'typescript';

const here = path.dirname(fileURLToPath(import.meta.url));
const require = createRequire(import.meta.url);

if (process.argv.length !== 4) {
  console.error('usage: node check.mjs DASHBOARD_DIR OUT_DIR');
  process.exit(2);
}
const [dashboardDir, outDir] = process.argv.slice(2).map((p) => path.resolve(p));

/** The data source every panel must query: the dashboard's `datasource` variable of plugin `prometheus`. */
const DATASOURCE_VARIABLE = 'datasource';
const PROMETHEUS_REF = { type: 'prometheus', uid: '${' + DATASOURCE_VARIABLE + '}' };

// ----------------------------------------------------------------------------------------- Grafana's units

/**
 * Grafana's unit ids: the registry of @grafana/data (`getValueFormatterIndex`), plus the parameterised forms
 * its `getValueFormat` resolves (`suffix:tok/s`, `si:B`, …). Any other id would render silently as a
 * literal suffix, so it is an error here.
 */
function grafanaUnits() {
  // The date formatters read the browser's locale at registry build time; Node 20 has no `navigator`.
  globalThis.navigator ??= { language: 'en-US', languages: ['en-US'] };
  const formats = require(
    path.join(here, 'node_modules/@grafana/data/dist/cjs/valueFormats/valueFormats.cjs'),
  );
  const ids = new Set(Object.keys(formats.getValueFormatterIndex()));
  if (ids.size < 100) {
    throw new Error(`@grafana/data lists only ${ids.size} units; its value-format registry moved`);
  }
  return ids;
}

const PARAMETERISED_UNITS = ['prefix', 'suffix', 'time', 'si', 'count', 'currency', 'bool'];

function unitProblem(unit, units) {
  if (typeof unit !== 'string' || unit === '') {
    return 'no unit (every panel states one; `none` for a plain number)';
  }
  if (units.has(unit)) return null;
  const colon = unit.indexOf(':');
  if (colon > 0 && PARAMETERISED_UNITS.includes(unit.slice(0, colon)) && unit.length > colon + 1) {
    return null;
  }
  return `\`${unit}\` is not a Grafana unit id (nor one of ${PARAMETERISED_UNITS.map((p) => p + ':…').join(', ')})`;
}

// ----------------------------------------------------------------------------- the panel plugins' types

/** Panel type → the package's module for its plugin, with the names that module exports. */
function panelPluginTypes() {
  const schemaDir = path.join(here, 'node_modules/@grafana/schema');
  const exports = JSON.parse(fs.readFileSync(path.join(schemaDir, 'package.json'), 'utf8')).exports;
  const plugins = new Map();
  for (const [subpath, target] of Object.entries(exports)) {
    const m = /^\.\/dist\/esm\/raw\/composable\/([a-z0-9]+)\/panelcfg\/x\/\w+_types\.gen$/.exec(subpath);
    if (!m) continue;
    const declarations = fs.readFileSync(path.join(schemaDir, target.types), 'utf8');
    plugins.set(m[1], {
      module: '@grafana/schema' + subpath.slice(1),
      hasOptions: /export interface Options\b/.test(declarations),
      hasFieldConfig: /export interface FieldConfig\b/.test(declarations),
    });
  }
  return plugins;
}

/** The package names a plugin's folder after its id without dashes: `state-timeline` → `statetimeline`. */
const pluginKey = (panelType) => String(panelType).replaceAll('-', '');

// ------------------------------------------------------------------- JSON → TypeScript, with a line map

/**
 * Renders `value` as a TypeScript expression, one property per line, and records for every line the JSON
 * path it belongs to, so that a compiler diagnostic maps back to a dashboard field. `suffixAt(path)` adds
 * text (a `satisfies` clause) after the value at `path`.
 */
function renderWithPaths(value, suffixAt) {
  const lines = [];
  const walk = (v, p, key, comma, depth) => {
    const pad = '  '.repeat(depth);
    const lead = pad + (key === null ? '' : JSON.stringify(key) + ': ');
    const tail = (suffixAt(p) ?? '') + comma;
    const entries =
      v !== null && typeof v === 'object'
        ? Array.isArray(v)
          ? v.map((x, i) => [i, x])
          : Object.entries(v)
        : [];
    if (entries.length === 0) {
      lines.push({ text: lead + JSON.stringify(v) + tail, path: p });
      return;
    }
    const [open, close] = Array.isArray(v) ? ['[', ']'] : ['{', '}'];
    lines.push({ text: lead + open, path: p });
    entries.forEach(([k, x], i) => {
      walk(x, [...p, k], Array.isArray(v) ? null : k, i + 1 < entries.length ? ',' : '', depth + 1);
    });
    lines.push({ text: pad + close + tail, path: p });
  };
  walk(value, [], null, '', 0);
  return lines;
}

/** `panels[3].panels[0]` style: the JSON path of a panel inside the dashboard, or null. */
function panelPrefixLength(p) {
  let n = 0;
  while (p[n] === 'panels' && typeof p[n + 1] === 'number') n += 2;
  return n;
}

function fieldName(p) {
  return p.map((k, i) => (typeof k === 'number' ? `[${k}]` : i === 0 ? k : '.' + k)).join('');
}

function panelAt(dashboard, p) {
  let panel = dashboard;
  for (let i = 0; i < p.length; i += 2) panel = panel.panels[p[i + 1]];
  return panel;
}

function describePanel(panel) {
  const title = typeof panel.title === 'string' ? panel.title : '';
  return `panel ${panel.id ?? '?'} ${JSON.stringify(title)} (${panel.type ?? 'no type'})`;
}

/** `<file>: panel … : <field>` for the JSON path `p` of the dashboard. */
function locate(file, dashboard, p) {
  const n = panelPrefixLength(p);
  const where = [file];
  if (n > 0) where.push(describePanel(panelAt(dashboard, p.slice(0, n))));
  const field = fieldName(p.slice(n));
  if (field) where.push(field);
  return where.join(': ');
}

// ------------------------------------------------------------------------------------------- the checks

function* allPanels(list, prefix = []) {
  for (const [i, panel] of (Array.isArray(list) ? list : []).entries()) {
    const p = [...prefix, 'panels', i];
    if (panel && typeof panel === 'object') {
      yield [panel, p];
      yield* allPanels(panel.panels, p);
    }
  }
}

const sameRef = (ref) =>
  ref !== null &&
  typeof ref === 'object' &&
  ref.type === PROMETHEUS_REF.type &&
  ref.uid === PROMETHEUS_REF.uid &&
  Object.keys(ref).length === 2;

/** Data source, unit and query problems of one dashboard, as [JSON path, message]. */
function semanticProblems(dashboard, units) {
  const problems = [];
  const variables = Array.isArray(dashboard.templating?.list) ? dashboard.templating.list : [];
  const dsIndex = variables.findIndex((v) => v?.name === DATASOURCE_VARIABLE);
  if (dsIndex < 0) {
    problems.push([['templating', 'list'], `no \`${DATASOURCE_VARIABLE}\` variable (type datasource, query prometheus)`]);
  } else {
    const v = variables[dsIndex];
    if (v.type !== 'datasource' || v.query !== 'prometheus') {
      problems.push([
        ['templating', 'list', dsIndex],
        `variable \`${DATASOURCE_VARIABLE}\` must be {type: "datasource", query: "prometheus"}, is {type: ${JSON.stringify(v.type)}, query: ${JSON.stringify(v.query)}}`,
      ]);
    }
  }
  const wanted = JSON.stringify(PROMETHEUS_REF);
  variables.forEach((v, i) => {
    if (v?.type === 'query' && !sameRef(v.datasource)) {
      problems.push([['templating', 'list', i, 'datasource'], `is ${JSON.stringify(v.datasource)}, expected ${wanted}`]);
    }
  });
  for (const [panel, p] of allPanels(dashboard.panels)) {
    if (panel.type === 'row') continue;
    if (!sameRef(panel.datasource)) {
      problems.push([[...p, 'datasource'], `is ${JSON.stringify(panel.datasource)}, expected ${wanted}`]);
    }
    const unitIssue = unitProblem(panel.fieldConfig?.defaults?.unit, units);
    if (unitIssue) problems.push([[...p, 'fieldConfig', 'defaults', 'unit'], unitIssue]);
    const overrides = Array.isArray(panel.fieldConfig?.overrides) ? panel.fieldConfig.overrides : [];
    overrides.forEach((o, i) => {
      (Array.isArray(o?.properties) ? o.properties : []).forEach((prop, j) => {
        if (prop?.id !== 'unit') return;
        const issue = unitProblem(prop.value, units);
        if (issue) {
          problems.push([[...p, 'fieldConfig', 'overrides', i, 'properties', j, 'value'], issue]);
        }
      });
    });
    const targets = Array.isArray(panel.targets) ? panel.targets : [];
    if (targets.length === 0) problems.push([[...p, 'targets'], 'no query targets']);
    targets.forEach((t, i) => {
      if (!sameRef(t?.datasource)) {
        problems.push([[...p, 'targets', i, 'datasource'], `is ${JSON.stringify(t?.datasource)}, expected ${wanted}`]);
      }
      if (typeof t?.expr !== 'string' || t.expr.trim() === '') {
        problems.push([[...p, 'targets', i, 'expr'], 'no PromQL expression']);
      }
    });
  }
  return problems;
}

/** Writes one .ts file per dashboard and returns {file, dashboard, lines, firstLine} per dashboard. */
function generate(dashboards, plugins) {
  const sources = [];
  const unknownPlugins = [];
  for (const { file, dashboard } of dashboards) {
    const imports = new Map();
    const suffixAt = (p) => {
      const n = panelPrefixLength(p);
      if (n === 0 || n !== p.length) return null;
      const panel = panelAt(dashboard, p);
      if (panel.type === 'row') return null;
      const plugin = plugins.get(pluginKey(panel.type));
      if (!plugin || !plugin.hasOptions) {
        unknownPlugins.push([file, dashboard, p]);
        return null;
      }
      const alias = 'plugin_' + pluginKey(panel.type);
      imports.set(alias, plugin.module);
      const custom = plugin.hasFieldConfig ? `${alias}.FieldConfig` : 'NoCustomFieldConfig';
      return ` satisfies TypedPanel<${alias}.Options, ${custom}>`;
    };
    const body = renderWithPaths(dashboard, suffixAt);
    const header = [
      `// Generated by dashboards/typecheck/check.mjs from ${file}; edit the JSON, not this file.`,
      `import type { GrafanaDashboard, NoCustomFieldConfig, TypedPanel } from '../grafana.js';`,
      ...[...imports].map(([alias, module]) => `import type * as ${alias} from '${module}';`),
      `export const dashboard =`,
    ];
    body[body.length - 1].text += ' satisfies GrafanaDashboard;';
    const text = [...header, ...body.map((l) => l.text)].join('\n') + '\n';
    const tsFile = path.join(outDir, file.replace(/\.json$/, '.ts'));
    fs.writeFileSync(tsFile, text);
    sources.push({ file, dashboard, tsFile, lines: body, firstLine: header.length });
  }
  return { sources, unknownPlugins };
}

function compile(sources) {
  const configPath = path.join(outDir, 'tsconfig.json');
  const config = {
    compilerOptions: {
      strict: true,
      noEmit: true,
      target: 'ES2022',
      module: 'ESNext',
      moduleResolution: 'Bundler',
      // The package's own declarations are not under test, and @grafana/data drags in @types it never uses.
      skipLibCheck: true,
      types: [],
    },
    files: ['../grafana.ts', ...sources.map((s) => path.basename(s.tsFile))],
  };
  fs.writeFileSync(configPath, JSON.stringify(config, null, 2) + '\n');
  const parsed = ts.parseJsonConfigFileContent(config, ts.sys, outDir, undefined, configPath);
  const program = ts.createProgram(parsed.fileNames, parsed.options);
  return ts.getPreEmitDiagnostics(program);
}

function main() {
  const files = fs
    .readdirSync(dashboardDir)
    .filter((f) => f.endsWith('.json'))
    .sort();
  if (files.length === 0) {
    console.error(`no dashboard JSON files in ${dashboardDir}`);
    process.exit(1);
  }
  const problems = [];
  const dashboards = [];
  for (const file of files) {
    try {
      dashboards.push({ file, dashboard: JSON.parse(fs.readFileSync(path.join(dashboardDir, file), 'utf8')) });
    } catch (e) {
      problems.push(`${file}: not valid JSON: ${e.message}`);
    }
  }
  fs.mkdirSync(outDir, { recursive: true });
  const units = grafanaUnits();
  const { sources, unknownPlugins } = generate(dashboards, panelPluginTypes());
  for (const [file, dashboard, p] of unknownPlugins) {
    problems.push(`${locate(file, dashboard, p)}: type: @grafana/schema types no panel plugin of this type`);
  }
  for (const { file, dashboard } of dashboards) {
    for (const [p, message] of semanticProblems(dashboard, units)) {
      problems.push(`${locate(file, dashboard, p)}: ${message}`);
    }
  }
  const byTsFile = new Map(sources.map((s) => [path.resolve(s.tsFile), s]));
  for (const d of compile(sources)) {
    const message = ts.flattenDiagnosticMessageText(d.messageText, '\n      ');
    const source = d.file && byTsFile.get(path.resolve(d.file.fileName));
    if (!source) {
      const where = d.file ? `${d.file.fileName}: ` : '';
      problems.push(`${where}TS${d.code}: ${message}`);
      continue;
    }
    const line = d.file.getLineAndCharacterOfPosition(d.start ?? 0).line - source.firstLine;
    const p = source.lines[Math.max(0, Math.min(line, source.lines.length - 1))].path;
    problems.push(`${locate(source.file, source.dashboard, p)}: TS${d.code}: ${message}`);
  }
  if (problems.length > 0) {
    // Grouped by file; within a file in the order found.
    const fileOf = (line) => line.slice(0, line.indexOf(':'));
    problems.sort((a, b) => fileOf(a).localeCompare(fileOf(b)));
    console.error(problems.join('\n'));
    console.error(
      `\n${problems.length} problem(s) in ${dashboardDir} (checked against @grafana/schema ${schemaVersion()} and TypeScript ${ts.version})`,
    );
    process.exit(1);
  }
  console.log(
    `${files.length} dashboard(s) in ${dashboardDir} satisfy @grafana/schema ${schemaVersion()} (TypeScript ${ts.version}); every unit is a Grafana unit and every query uses the \`${DATASOURCE_VARIABLE}\` variable`,
  );
}

function schemaVersion() {
  return JSON.parse(fs.readFileSync(path.join(here, 'node_modules/@grafana/schema/package.json'), 'utf8')).version;
}

main();
