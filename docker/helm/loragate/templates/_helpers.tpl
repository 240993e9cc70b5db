{{/* The chart's name, and the release's full name (at most 63 characters, a DNS label). */}}
{{- define "loragate.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "loragate.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "loragate.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels on every object: these, with the selector labels of its component (or name and instance). */}}
{{- define "loragate.metaLabels" -}}
helm.sh/chart: {{ include "loragate.chart" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "loragate.labels" -}}
{{ include "loragate.metaLabels" . }}
app.kubernetes.io/name: {{ include "loragate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "loragate.gateway.labels" -}}
{{ include "loragate.metaLabels" . }}
{{ include "loragate.gateway.selectorLabels" . }}
{{- end -}}

{{/* The gateway's selector labels. */}}
{{- define "loragate.gateway.selectorLabels" -}}
app.kubernetes.io/name: {{ include "loragate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: gateway
{{- end -}}

{{/* An engine's name and selector labels: call with (dict "root" $ "model" $model). */}}
{{- define "loragate.vllm.fullname" -}}
{{- printf "%s-vllm-%s" (include "loragate.fullname" .root) .model.name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* A model's headless Service: its name resolves to every ready replica (the gateway's pool.dns). */}}
{{- define "loragate.vllm.enginesName" -}}
{{- printf "%s-engines" (include "loragate.vllm.fullname" . | trunc 55 | trimSuffix "-") -}}
{{- end -}}

{{- define "loragate.vllm.selectorLabels" -}}
app.kubernetes.io/name: {{ include "loragate.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: vllm
loragate.dev/base-model: {{ .model.name }}
{{- end -}}

{{- define "loragate.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "loragate.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The Secret the pods read: the user's, or the chart's (which needs database.url). */}}
{{- define "loragate.secretName" -}}
{{- if .Values.existingSecret -}}
{{- .Values.existingSecret -}}
{{- else -}}
{{- include "loragate.fullname" . -}}
{{- end -}}
{{- end -}}

{{- define "loragate.image" -}}
{{- printf "%s:%s" .image.repository (default .root.Chart.AppVersion .image.tag) -}}
{{- end -}}

{{/* The first model: the engine the gateway serves through. */}}
{{- define "loragate.vllm.primary" -}}
{{- $models := .Values.vllm.models | default list -}}
{{- if not $models -}}
{{- fail "vllm.models must list at least one base model (the gateway serves through the first)" -}}
{{- end -}}
{{- toYaml (first $models) -}}
{{- end -}}

{{/* loragate.yaml: what the chart sets, with gateway.config merged over it. */}}
{{- define "loragate.config" -}}
{{- $primary := include "loragate.vllm.primary" . | fromYaml -}}
{{- $engines := printf "http://%s:%v" (include "loragate.vllm.enginesName" (dict "root" . "model" $primary)) .Values.vllm.port -}}
{{- $store := dict "url" .Values.store.url "cache_dir" "/cache" "cache_max_gb" .Values.store.cacheMaxGb -}}
{{- if .Values.store.endpointUrl -}}
{{- $_ := set $store "endpoint_url" .Values.store.endpointUrl -}}
{{- end -}}
{{- if .Values.store.region -}}
{{- $_ := set $store "region" .Values.store.region -}}
{{- end -}}
{{- /* Every replica of the first model, found through its headless Service, routed by adapter residency. */ -}}
{{- $pool := dict "base_model" $primary.baseModel "dns" (list $engines) "discover" false "max_loras" (int (default 8 $primary.maxLoras)) "price" (dict "usd_per_hour" .Values.gateway.gpuUsdPerHour) -}}
{{- $gateway := dict "host" "0.0.0.0" "port" (int .Values.gateway.port) "backend" "pool" "pool" $pool -}}
{{- $config := dict "gateway" $gateway "store" $store -}}
{{- toYaml (mergeOverwrite $config (deepCopy (default (dict) .Values.gateway.config))) -}}
{{- end -}}

{{/* The object store's environment, for the gateway and every engine. */}}
{{- define "loragate.storeEnv" -}}
- name: LORAGATE_STORE__URL
  value: {{ required "store.url is required (s3://bucket/prefix)" .Values.store.url | quote }}
{{- if .Values.store.endpointUrl }}
- name: LORAGATE_STORE__ENDPOINT_URL
  value: {{ .Values.store.endpointUrl | quote }}
{{- end }}
- name: LORAGATE_STORE__CACHE_DIR
  value: /cache
- name: LORAGATE_STORE__CACHE_MAX_GB
  value: {{ .Values.store.cacheMaxGb | quote }}
{{- if .Values.store.region }}
- name: AWS_REGION
  value: {{ .Values.store.region | quote }}
{{- end }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ include "loragate.secretName" . }}
      key: {{ .Values.existingSecretKeys.awsAccessKeyId }}
      optional: true
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "loragate.secretName" . }}
      key: {{ .Values.existingSecretKeys.awsSecretAccessKey }}
      optional: true
{{- end -}}

{{/* The admin key: the value given, else the one already in the release's Secret, else a new one. */}}
{{- define "loragate.adminKey" -}}
{{- if .Values.adminKey -}}
{{- if lt (len .Values.adminKey) 32 }}{{ fail "adminKey must be at least 32 characters" }}{{ end -}}
{{- .Values.adminKey -}}
{{- else -}}
{{- $secret := lookup "v1" "Secret" .Release.Namespace (include "loragate.fullname" .) | default dict -}}
{{- $kept := dig "data" .Values.existingSecretKeys.adminKey "" $secret -}}
{{- if $kept }}{{ $kept | b64dec }}{{ else }}{{ randAlphaNum 48 }}{{ end -}}
{{- end -}}
{{- end -}}
