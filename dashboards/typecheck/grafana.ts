// Grafana's own dashboard and panel types from @grafana/schema, as a dashboard JSON file must satisfy them.
//
// JSON holds plain strings where the package declares TypeScript string enums (`FieldColorModeId`,
// `ThresholdsMode`, `BigValueColorMode`, …), so `Json<T>` turns every string enum into the union of its
// values; everything else, required fields and excess-property checks included, stays as the package has it.
import type { Dashboard, DataQuery, DataSourceRef, FieldConfig, FieldConfigSource, Panel } from '@grafana/schema';

export type Json<T> = T extends string
  ? `${T}`
  : T extends number | boolean | null | undefined
    ? T
    : T extends ReadonlyArray<infer U>
      ? Array<Json<U>>
      : T extends object
        ? { [K in keyof T]: Json<T[K]> }
        : T;

export type GrafanaDashboard = Json<Dashboard>;

/**
 * A panel whose plugin the package types: its `options` and `fieldConfig.defaults.custom` are checked against
 * the plugin's `Options` and `FieldConfig`. Only the top level is partial, because Grafana fills in a
 * plugin's missing options from its defaults; a nested object that is present must be complete, as Grafana
 * itself saves it.
 */
export type TypedPanel<Options, Custom> = Json<
  Omit<Panel, 'options' | 'fieldConfig' | 'targets'> & {
    options?: Partial<Options>;
    fieldConfig?: Omit<FieldConfigSource, 'defaults'> & {
      defaults: Omit<FieldConfig, 'custom'> & { custom?: Partial<Custom> };
    };
    targets?: PrometheusQuery[];
  }
>;

/**
 * A panel plugin that declares options but no custom field config (stat, bar gauge): `custom` must be absent
 * or empty.
 */
export type NoCustomFieldConfig = Record<string, never>;

/**
 * A Prometheus query target. @grafana/schema types only the common part (`DataQuery`: refId, hide,
 * queryType, datasource); the Prometheus data source's own query model ships in @grafana/prometheus, which
 * drags in Grafana's whole UI, so its JSON fields are listed here.
 */
export interface PrometheusQuery extends DataQuery {
  datasource?: DataSourceRef;
  expr: string;
  legendFormat?: string;
  instant?: boolean;
  range?: boolean;
  exemplar?: boolean;
  format?: 'time_series' | 'table' | 'heatmap';
  interval?: string;
  intervalFactor?: number;
  editorMode?: 'code' | 'builder';
}
