{{/*
Pod pieces shared by every Baton pod: scheduling, security, volumes and their mounts.
The root filesystem is read-only; everything a process writes goes to an emptyDir or a volume:
  /tmp, /home/baton ($HOME: kernel caches), /var/cache/baton (BATON_CACHE_DIR), /dev/shm (NCCL, Ray),
  /var/run/secrets/baton (the shared secret, Redis password, Ray token as files), the model volume.

Common args: ctx, role, workerRole, launcher (see baton.env).
*/}}

{{/* Which volumes a process needs (YAML dict, parsed with fromYaml). */}}
{{- define "baton.podNeeds" -}}
{{- $v := .ctx.Values -}}
{{- $baton := or (ne .role "ray-head") .launcher -}}
baton: {{ $baton }}
model: {{ or (ne .workerRole "") .launcher (eq .role "router") }}
shm: {{ ne .role "router" }}
rayToken: {{ and (eq $v.ray.mode "deployments") (has .role (list "ray-head" "prefill" "decode")) }}
redisPassword: {{ and $baton (ne (include "baton.redisSecretName" .ctx) "") }}
{{- end -}}

{{/* Args: ctx, spec (a values section with nodeSelector, tolerations, affinity), gpus. */}}
{{- define "baton.podScheduling" -}}
serviceAccountName: {{ include "baton.serviceAccountName" .ctx }}
automountServiceAccountToken: {{ .ctx.Values.serviceAccount.automountToken }}
{{- with .ctx.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- toYaml .ctx.Values.podSecurityContext | nindent 2 }}
{{- with .spec.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .spec.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- $tolerations := .spec.tolerations | default list -}}
{{- if gt (int .gpus) 0 }}
{{- /* GPU nodes are commonly tainted nvidia.com/gpu:NoSchedule (GPU operator, managed node pools). */ -}}
{{- $tolerations = append $tolerations (dict "key" "nvidia.com/gpu" "operator" "Exists" "effect" "NoSchedule") -}}
{{- end }}
{{- with $tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* Container resources with nvidia.com/gpu added to the limits. Args: resources, gpus. */}}
{{- define "baton.resources" -}}
{{- $out := dict -}}
{{- with .resources.requests -}}
{{- $_ := set $out "requests" . -}}
{{- end -}}
{{- $limits := deepCopy (.resources.limits | default dict) -}}
{{- if gt (int .gpus) 0 -}}
{{- $_ := set $limits "nvidia.com/gpu" (int .gpus) -}}
{{- end -}}
{{- with $limits -}}
{{- $_ := set $out "limits" . -}}
{{- end -}}
{{- toYaml $out -}}
{{- end -}}

{{- define "baton.volumes" -}}
{{- $v := .ctx.Values -}}
{{- $needs := include "baton.podNeeds" . | fromYaml -}}
- name: tmp
  emptyDir: {}
- name: home
  emptyDir: {}
{{- if $needs.shm }}
- name: shm
  emptyDir:
    medium: Memory
    sizeLimit: {{ $v.workers.shmSizeLimit }}
{{- end }}
{{- if $needs.model }}
- name: cache
{{- if $v.model.cache.existingClaim }}
  persistentVolumeClaim:
    claimName: {{ $v.model.cache.existingClaim }}
{{- else }}
  emptyDir:
    sizeLimit: {{ $v.model.cache.sizeLimit }}
{{- end }}
{{- if eq $v.model.source "pvc" }}
- name: model
  persistentVolumeClaim:
    claimName: {{ $v.model.pvc.claimName }}
    readOnly: true
{{- end }}
{{- end }}
{{- if or $needs.baton $needs.rayToken }}
- name: secrets
  projected:
    defaultMode: 0440
    sources:
      - secret:
          name: {{ include "baton.authSecretName" .ctx }}
          items:
          {{- if $needs.baton }}
            - key: {{ $v.auth.secretKey }}
              path: secret
          {{- end }}
          {{- if $needs.rayToken }}
            - key: {{ $v.auth.rayTokenKey }}
              path: ray-auth-token
          {{- end }}
      {{- if $needs.redisPassword }}
      - secret:
          name: {{ include "baton.redisSecretName" .ctx }}
          items:
            - key: {{ include "baton.redisPasswordKey" .ctx }}
              path: redis-password
      {{- end }}
{{- end }}
{{- end -}}

{{- define "baton.volumeMounts" -}}
{{- $v := .ctx.Values -}}
{{- $needs := include "baton.podNeeds" . | fromYaml -}}
- name: tmp
  mountPath: /tmp
- name: home
  mountPath: /home/baton
{{- if $needs.shm }}
- name: shm
  mountPath: /dev/shm
{{- end }}
{{- if $needs.model }}
- name: cache
  mountPath: /var/cache/baton
{{- if eq $v.model.source "pvc" }}
- name: model
  mountPath: {{ $v.model.pvc.mountPath }}
  readOnly: true
{{- end }}
{{- end }}
{{- if or $needs.baton $needs.rayToken }}
- name: secrets
  mountPath: /var/run/secrets/baton
  readOnly: true
{{- end }}
{{- end -}}

{{/* The gRPC health probes of a worker on its control port (grpc.health.v1, service ""). */}}
{{- define "baton.workerProbes" -}}
{{- $w := .Values.workers -}}
startupProbe:
  grpc:
    port: {{ $w.ports.grpc | int }}
  periodSeconds: 10
  timeoutSeconds: 5
  failureThreshold: {{ max 1 (div (int $w.startupTimeoutSeconds) 10) }}
readinessProbe:
  grpc:
    port: {{ $w.ports.grpc | int }}
  periodSeconds: 5
  timeoutSeconds: 3
  failureThreshold: 3
livenessProbe:
  grpc:
    port: {{ $w.ports.grpc | int }}
  periodSeconds: 15
  timeoutSeconds: 5
  failureThreshold: 4
{{- end -}}

{{- define "baton.workerPorts" -}}
- name: grpc
  containerPort: {{ .Values.workers.ports.grpc | int }}
- name: kv
  containerPort: {{ .Values.workers.ports.kv | int }}
- name: metrics
  containerPort: {{ .Values.workers.ports.metrics | int }}
{{- end -}}
