{{/*
Names, labels and the small derived values every template shares.
Components: router, prefill, decode, ray-head, redis.
*/}}

{{- define "baton.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "baton.fullname" -}}
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

{{/* "<fullname>-<component>", within the 63-character limit of a DNS label. Args: ctx, component. */}}
{{- define "baton.componentName" -}}
{{- printf "%s-%s" (include "baton.fullname" .ctx) .component | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "baton.selectorLabels" -}}
app.kubernetes.io/name: {{ include "baton.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "baton.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "baton.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: baton
{{- end -}}

{{/* Args: ctx, component. */}}
{{- define "baton.componentSelectorLabels" -}}
{{ include "baton.selectorLabels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* Args: ctx, component. */}}
{{- define "baton.componentLabels" -}}
{{ include "baton.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "baton.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}

{{- define "baton.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "baton.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The Secret holding the shared secret (and the Ray token in deployments mode). */}}
{{- define "baton.authSecretName" -}}
{{- .Values.auth.existingSecret | default (printf "%s-auth" (include "baton.fullname" .)) -}}
{{- end -}}

{{/* The Secret holding the Redis password; empty when an external Redis has none. */}}
{{- define "baton.redisSecretName" -}}
{{- if .Values.redis.enabled -}}
{{- .Values.redis.auth.existingSecret | default (include "baton.componentName" (dict "ctx" . "component" "redis")) -}}
{{- else -}}
{{- .Values.redis.external.existingSecret -}}
{{- end -}}
{{- end -}}

{{- define "baton.redisPasswordKey" -}}
{{- if .Values.redis.enabled -}}
{{- .Values.redis.auth.passwordKey -}}
{{- else -}}
{{- .Values.redis.external.passwordKey -}}
{{- end -}}
{{- end -}}

{{- define "baton.redisUrl" -}}
{{- if .Values.redis.enabled -}}
{{- printf "redis://%s:6379/0" (include "baton.componentName" (dict "ctx" . "component" "redis")) -}}
{{- else -}}
{{- .Values.redis.external.url -}}
{{- end -}}
{{- end -}}

{{/*
A secret value that survives upgrades: the one already in the cluster if the Secret exists (lookup),
otherwise a fresh random one. Offline renders (helm template, lint) always get a fresh one.
Args: ctx, name, key. Returns the base64-encoded value.
*/}}
{{- define "baton.persistentSecretValue" -}}
{{- $existing := lookup "v1" "Secret" .ctx.Release.Namespace .name | default dict -}}
{{- $current := dig "data" .key "" $existing -}}
{{- if $current -}}
{{- $current -}}
{{- else -}}
{{- randAlphaNum 48 | b64enc -}}
{{- end -}}
{{- end -}}

{{/* Cross-field rules a JSON schema cannot state clearly; fail at install with a readable message. */}}
{{- define "baton.validate" -}}
{{- if and (not .Values.redis.enabled) (not .Values.redis.external.url) -}}
{{- fail "redis: a placement store is required: set redis.enabled=true or redis.external.url" -}}
{{- end -}}
{{- if and (eq .Values.model.source "pvc") (not .Values.model.pvc.claimName) -}}
{{- fail "model.source=pvc needs model.pvc.claimName" -}}
{{- end -}}
{{- if and (has .Values.model.source (list "hf" "pvc")) (not .Values.model.name) -}}
{{- fail (printf "model.source=%s needs model.name" .Values.model.source) -}}
{{- end -}}
{{- if and .Values.autoscaling.enabled (eq .Values.ray.mode "kuberay") -}}
{{- fail "autoscaling.enabled scales Deployments (ray.mode=deployments); with ray.mode=kuberay use ray.kuberay.autoscaler" -}}
{{- end -}}
{{- if and (eq .Values.ray.mode "kuberay") (ne (int .Values.prefill.gpusPerWorker) (int .Values.decode.gpusPerWorker)) -}}
{{- fail "ray.mode=kuberay: `baton up` gives every worker actor the same GPU count; set prefill.gpusPerWorker = decode.gpusPerWorker" -}}
{{- end -}}
{{- end -}}
