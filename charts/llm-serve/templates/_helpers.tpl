{{- define "llm-serve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Release-scoped base name; component suffixes (-engine, -gateway) keep it under 63. */}}
{{- define "llm-serve.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 48 | trimSuffix "-" }}
{{- else if contains (include "llm-serve.name" .) .Release.Name }}
{{- .Release.Name | trunc 48 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name (include "llm-serve.name" .) | trunc 48 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "llm-serve.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "llm-serve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Selector labels of one component: call with (dict "ctx" $ "component" "engine"). */}}
{{- define "llm-serve.selector" -}}
app.kubernetes.io/name: {{ include "llm-serve.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "llm-serve.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "llm-serve.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "llm-serve.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{- define "llm-serve.apiKeysSecret" -}}
{{- .Values.apiKeys.existingSecret | default (printf "%s-api-keys" (include "llm-serve.fullname" .)) }}
{{- end }}

{{- define "llm-serve.apiKeysEnabled" -}}
{{- if or .Values.apiKeys.existingSecret .Values.apiKeys.keys (not .Values.apiKeys.allowUnauthenticated) }}true{{ end }}
{{- end }}

{{/* OpenTelemetry's standard variables; call with (dict "ctx" $ "service" "llm-engine"). */}}
{{- define "llm-serve.otelEnv" -}}
{{- if .ctx.Values.otel.enabled }}
- name: OTEL_SERVICE_NAME
  value: {{ .service | quote }}
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ required "otel.endpoint is required when otel.enabled" .ctx.Values.otel.endpoint | quote }}
{{- /* The engine exports spans only when OTEL_TRACES_EXPORTER says so (otlp or console). */}}
- name: OTEL_TRACES_EXPORTER
  value: "otlp"
- name: OTEL_RESOURCE_ATTRIBUTES
  value: {{ printf "service.namespace=%s,service.instance.id=$(POD_NAME)" .ctx.Release.Namespace | quote }}
{{- end }}
{{- end }}

{{- define "llm-serve.engineTokenSecret" -}}
{{- .Values.engineAuth.existingSecret | default (printf "%s-engine-token" (include "llm-serve.fullname" .)) }}
{{- end }}

{{/* The Prometheus job of a component's metrics, as the chart's monitors label it. */}}
{{- define "llm-serve.job" -}}
{{ include "llm-serve.fullname" .ctx }}-{{ .component }}
{{- end }}

{{/* PromQL matchers of one component's series: (dict "ctx" $ "component" "engine"). */}}
{{- define "llm-serve.promSelector" -}}
namespace="{{ .ctx.Release.Namespace }}",job="{{ include "llm-serve.job" . }}"
{{- end }}
