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

{{/* The Redis URL (never with a password: that travels by env from a Secret). A rediss:// URL whose
CA comes from redis.tls.secretName names the mounted ca.crt (the same path in every pod). */}}
{{- define "kvmesh.redis.url" -}}
{{- $url := "" }}
{{- if .Values.redis.enabled }}
{{- $scheme := ternary "rediss" "redis" .Values.redis.tls.enabled }}
{{- $url = printf "%s://%s-redis.%s.svc:6379/0" $scheme (include "kvmesh.fullname" .) .Release.Namespace }}
{{- else }}
{{- $url = required "redis.external.url is required when redis.enabled is false" .Values.redis.external.url }}
{{- if .Values.redis.tls.enabled }}
{{- fail "redis.tls.enabled serves the bundled Redis over TLS; for an external Redis give a rediss:// redis.external.url (and its CA in redis.tls.secretName)" }}
{{- end }}
{{- end }}
{{- if include "kvmesh.redis.caSecret" . }}
{{- $url = printf "%s%sssl_ca_certs=%s/ca.crt" $url (ternary "&" "?" (contains "?" $url)) (include "kvmesh.redis.caMount" .) }}
{{- end }}
{{- $url }}
{{- end }}

{{/* The Secret whose ca.crt clients trust the Redis server with ("" when none is mounted). */}}
{{- define "kvmesh.redis.caSecret" -}}
{{- if .Values.redis.tls.secretName }}
{{- if and (not .Values.redis.enabled) (not (hasPrefix "rediss://" .Values.redis.external.url)) }}
{{- fail "redis.tls.secretName is the CA of a TLS Redis: redis.external.url must be rediss://" }}
{{- end }}
{{- .Values.redis.tls.secretName }}
{{- end }}
{{- end }}

{{- define "kvmesh.redis.caMount" -}}/etc/kvmesh/redis-ca{{- end }}

{{/* redis-server flags of the bundled Redis under redis.tls: TLS only, on the usual port; clients are
authenticated by the password, not by certificates. */}}
{{- define "kvmesh.redis.tlsArgs" -}}
{{- list "--port" "0" "--tls-port" "6379" "--tls-cert-file" "/etc/redis/tls/tls.crt" "--tls-key-file" "/etc/redis/tls/tls.key" "--tls-ca-cert-file" "/etc/redis/tls/ca.crt" "--tls-auth-clients" "no" | toJson }}
{{- end }}

{{/* Certificates of the gateway and the workers (the operator mounts the workers' at the same path). */}}
{{- define "kvmesh.tls.mount" -}}/etc/kvmesh/tls{{- end }}

{{- define "kvmesh.tls.secretName" -}}
{{- required "tls.secretName is required when tls.enabled is true (a kubernetes.io/tls Secret: tls.crt, tls.key, ca.crt)" .Values.tls.secretName }}
{{- end }}

{{- define "kvmesh.tls.workerSecretName" -}}
{{- default (include "kvmesh.tls.secretName" .) .Values.tls.workerSecretName }}
{{- end }}

{{- define "kvmesh.tls.workerServerName" -}}
{{- default (printf "%s-gateway.%s.svc" (include "kvmesh.fullname" .) .Release.Namespace) .Values.tls.workerServerName }}
{{- end }}

{{/* The Redis CA volume of the operator and the gateways (with kvmesh.redis.caMounts). */}}
{{- define "kvmesh.redis.caVolumes" -}}
{{- with include "kvmesh.redis.caSecret" . }}
- name: redis-ca
  secret:
    secretName: {{ . }}
    defaultMode: 0440
    items:
      - key: ca.crt
        path: ca.crt
{{- end }}
{{- end }}

{{- define "kvmesh.redis.caMounts" -}}
{{- if include "kvmesh.redis.caSecret" . }}
- name: redis-ca
  mountPath: {{ include "kvmesh.redis.caMount" . }}
  readOnly: true
{{- end }}
{{- end }}

{{/* The Secret and key holding the Redis password (when redis.auth.enabled). */}}
{{- define "kvmesh.redis.passwordSecretName" -}}
{{- default (printf "%s-redis" (include "kvmesh.fullname" .)) .Values.redis.auth.existingSecret }}
{{- end }}

{{- define "kvmesh.redis.passwordSecretKey" -}}
{{- if .Values.redis.auth.existingSecret }}{{ .Values.redis.auth.existingSecretPasswordKey }}{{ else }}password{{ end }}
{{- end }}

{{/* Env of the operator and the gateways: the URL, and the password from its Secret (never argv). */}}
{{- define "kvmesh.redis.env" -}}
- name: KVMESH_REDIS_URL
  value: {{ include "kvmesh.redis.url" . | quote }}
{{- if .Values.redis.auth.enabled }}
- name: KVMESH_REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "kvmesh.redis.passwordSecretName" . }}
      key: {{ include "kvmesh.redis.passwordSecretKey" . }}
{{- end }}
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
# Children, created and converged by server-side apply (an apply that creates needs "create") and
# watched (status and drift repair come from their watch events). Never deleted: the garbage
# collector does that.
- apiGroups: ["apps"]
  resources: ["deployments"]
  verbs: ["get", "list", "watch", "create", "patch"]
- apiGroups: [""]
  resources: ["services"]
  verbs: ["list", "watch", "create", "patch"]
- apiGroups: ["policy"]
  resources: ["poddisruptionbudgets"]
  verbs: ["list", "watch", "create", "patch"]
# Kubernetes events about InferenceDeployments (each a new core/v1 Event object).
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
{{- end }}
