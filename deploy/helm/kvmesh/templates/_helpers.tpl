{{/* Chart name. */}}
{{- define "kvmesh.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name prefix of the release's resources. */}}
{{- define "kvmesh.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "kvmesh.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Standard labels; pass (dict "ctx" $ "component" "operator"). */}}
{{- define "kvmesh.labels" -}}
helm.sh/chart: {{ include "kvmesh.chart" .ctx }}
{{ include "kvmesh.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/part-of: kvmesh
{{- with .ctx.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "kvmesh.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kvmesh.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "kvmesh.operator.serviceAccountName" -}}
{{- default (printf "%s-operator" (include "kvmesh.fullname" .)) .Values.operator.serviceAccount.name }}
{{- end }}

{{- define "kvmesh.image" -}}
{{- printf "%s:%s" .Values.image.repository .Values.image.tag }}
{{- end }}

{{/* The Secret and key that hold the Redis URL the operator, gateways and workers use. */}}
{{- define "kvmesh.redis.secretName" -}}
{{- if and (not .Values.redis.enabled) .Values.redis.external.existingSecret }}
{{- .Values.redis.external.existingSecret }}
{{- else }}
{{- printf "%s-redis" (include "kvmesh.fullname" .) }}
{{- end }}
{{- end }}

{{- define "kvmesh.redis.secretKey" -}}
{{- if and (not .Values.redis.enabled) .Values.redis.external.existingSecret }}
{{- .Values.redis.external.existingSecretKey }}
{{- else }}url{{- end }}
{{- end }}

{{/* Env var KVMESH_REDIS_URL from the Secret. */}}
{{- define "kvmesh.redis.env" -}}
- name: KVMESH_REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "kvmesh.redis.secretName" . }}
      key: {{ include "kvmesh.redis.secretKey" . }}
{{- end }}

{{/* The operator's permissions: exactly what it reads and writes (see docs/operator.md). */}}
{{- define "kvmesh.operator.rules" -}}
# InferenceDeployments: watched, annotated by kopf (progress), status written, scaled by the autoscaler.
- apiGroups: ["kvmesh.io"]
  resources: ["inferencedeployments"]
  verbs: ["get", "list", "watch", "patch"]
- apiGroups: ["kvmesh.io"]
  resources: ["inferencedeployments/status", "inferencedeployments/scale"]
  verbs: ["patch"]
# Owner references with blockOwnerDeletion need this where OwnerReferencesPermissionEnforcement is on.
- apiGroups: ["kvmesh.io"]
  resources: ["inferencedeployments/finalizers"]
  verbs: ["update"]
# Children, created and converged by server-side apply (an apply that creates needs "create"); only
# the worker Deployment is read back, for the status. Never deleted: the garbage collector does that.
- apiGroups: ["apps"]
  resources: ["deployments"]
  verbs: ["get", "create", "patch"]
- apiGroups: [""]
  resources: ["services", "configmaps"]
  verbs: ["create", "patch"]
- apiGroups: ["policy"]
  resources: ["poddisruptionbudgets"]
  verbs: ["create", "patch"]
# Kubernetes events about InferenceDeployments (kopf posts core/v1 events, each a new object).
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
{{- end }}
