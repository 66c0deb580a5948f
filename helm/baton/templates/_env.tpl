{{/*
The BATON_* environment of every Baton container: the chart's only way of configuring a process.
Names must be read by baton/settings.py (a test checks every name against baton.settings.ENV_VARS);
the three NCCL/torch/NVSHMEM variables below are the only others, plus Ray's own token variables
in deployments mode.

Args:
  ctx         the root context
  role        the process: router | prefill | decode | ray-head | ray-worker   (BATON_ROLE)
  workerRole  prefill | decode for processes that host a worker (the pod's values section); else ""
  launcher    true for the KubeRay head, which runs `baton up` and keeps the worker actors
*/}}
{{- define "baton.env" -}}
{{- $v := .ctx.Values -}}
{{- $isWorker := ne .workerRole "" -}}
{{- $usesModel := or $isWorker .launcher (eq .role "router") -}}
- name: BATON_ROLE
  value: {{ .role | quote }}
- name: BATON_HOST
{{- if eq .role "router" }}
  # The router is the release's public endpoint (Service, kubectl port-forward): all interfaces.
  value: "0.0.0.0"
{{- else }}
  valueFrom:
    fieldRef:
      fieldPath: status.podIP
{{- end }}
- name: BATON_LOG_LEVEL
  value: {{ $v.logLevel | quote }}
{{- if or (ne .role "ray-head") .launcher }}
- name: BATON_SECRET_FILE
  value: /var/run/secrets/baton/secret
- name: BATON_REDIS_URL
  value: {{ include "baton.redisUrl" .ctx | quote }}
{{- if include "baton.redisSecretName" .ctx }}
- name: BATON_REDIS_PASSWORD_FILE
  value: /var/run/secrets/baton/redis-password
{{- end }}
{{- with $v.metrics.otlpEndpoint }}
- name: BATON_OTLP_ENDPOINT
  value: {{ . | quote }}
{{- end }}
{{- end }}
{{- if $usesModel }}
{{- include "baton.modelEnv" (dict "ctx" .ctx "workerRole" .workerRole) }}
- name: BATON_CACHE_DIR
  value: /var/cache/baton
- name: BATON_BLOCK_SIZE
  value: {{ $v.engine.blockSize | int | quote }}
{{- with $v.engine.maxModelLen }}
- name: BATON_MAX_MODEL_LEN
  value: {{ . | int | quote }}
{{- end }}
{{- end }}
{{- if eq .role "router" }}
- name: BATON_HTTP_PORT
  value: {{ $v.router.ports.http | int | quote }}
- name: BATON_GRPC_PORT
  value: {{ $v.router.ports.grpc | int | quote }}
- name: BATON_ROUTING_POLICY
  value: {{ $v.router.routingPolicy | quote }}
{{- if not (kindIs "invalid" $v.router.localPrefillThreshold) }}
- name: BATON_LOCAL_PREFILL_THRESHOLD
  value: {{ $v.router.localPrefillThreshold | int | quote }}
{{- end }}
- name: BATON_FIRST_TOKEN_FROM
  value: {{ $v.router.firstOutputFrom | quote }}
{{- end }}
{{- if or $isWorker .launcher }}
{{- include "baton.workerEnv" (dict "ctx" .ctx "workerRole" .workerRole) }}
{{- end }}
{{- if .launcher }}
- name: BATON_NUM_PREFILL
  value: {{ $v.prefill.replicas | int | quote }}
- name: BATON_NUM_DECODE
  value: {{ $v.decode.replicas | int | quote }}
- name: BATON_RAY_ADDRESS
  value: auto
- name: BATON_RAY_ROLE_RESOURCES
  value: "true"
{{- end }}
{{- if eq .role "ray-head" }}
- name: BATON_DASHBOARD
  value: {{ ternary "on" "off" $v.ray.dashboard.enabled | quote }}
{{- end }}
{{- if and (eq $v.ray.mode "deployments") (has .role (list "ray-head" "prefill" "decode")) }}
{{- if ne .role "ray-head" }}
- name: BATON_RAY_ADDRESS
  value: {{ printf "%s:6379" (include "baton.componentName" (dict "ctx" .ctx "component" "ray-head")) | quote }}
{{- end }}
# Ray's own token authentication (KubeRay sets these itself in kuberay mode).
- name: RAY_AUTH_MODE
  value: token
- name: RAY_AUTH_TOKEN_PATH
  value: /var/run/secrets/baton/ray-auth-token
{{- end }}
# Multicast/NVLS paths are off: they hang or fail on shared and virtualised GPU hosts.
- name: NCCL_NVLS_ENABLE
  value: "0"
- name: TORCH_SYMM_MEM_DISABLE_MULTICAST
  value: "1"
- name: NVSHMEM_DISABLE_NVLS
  value: "1"
{{- end -}}

{{/* BATON_MODEL / BATON_LOAD_FORMAT / BATON_DTYPE. Args: ctx, workerRole (a role's `model` overrides model.name). */}}
{{- define "baton.modelEnv" -}}
{{- $m := .ctx.Values.model -}}
{{- $name := $m.name -}}
{{- if .workerRole -}}
{{- $name = (index .ctx.Values .workerRole).model | default $m.name -}}
{{- end -}}
{{- if eq $m.source "pvc" }}
- name: BATON_MODEL
  value: {{ printf "%s/%s" (trimSuffix "/" $m.pvc.mountPath) (trimPrefix "/" $name) | quote }}
{{- else if $name }}
- name: BATON_MODEL
  value: {{ $name | quote }}
{{- end }}
{{- if eq $m.source "dummy" }}
- name: BATON_LOAD_FORMAT
  value: dummy
{{- end }}
- name: BATON_DTYPE
  value: {{ $m.dtype | quote }}
{{- end -}}

{{/* Worker ports, GPUs and engine knobs. Args: ctx, workerRole ("" on the KubeRay head: both roles). */}}
{{- define "baton.workerEnv" -}}
{{- $v := .ctx.Values -}}
{{- $e := $v.engine -}}
{{- $gpus := $v.prefill.gpusPerWorker -}}
{{- if .workerRole -}}
{{- $gpus = (index $v .workerRole).gpusPerWorker -}}
{{- end }}
- name: BATON_WORKER_GRPC_PORT
  value: {{ $v.workers.ports.grpc | int | quote }}
- name: BATON_KV_PORT
  value: {{ $v.workers.ports.kv | int | quote }}
- name: BATON_METRICS_PORT
  value: {{ $v.workers.ports.metrics | int | quote }}
- name: BATON_GPUS_PER_WORKER
  value: {{ $gpus | int | quote }}
- name: BATON_GPU_MEMORY_UTILIZATION
  value: {{ $e.gpuMemoryUtilization | toString | quote }}
- name: BATON_KV_TRANSPORT
  value: {{ $e.kvTransport | quote }}
- name: BATON_SPECULATIVE
  value: {{ $e.speculative | quote }}
{{- with $e.maxNumSeqs }}
- name: BATON_MAX_NUM_SEQS
  value: {{ . | int | quote }}
{{- end }}
{{- with $e.maxNumBatchedTokens }}
- name: BATON_MAX_NUM_BATCHED_TOKENS
  value: {{ . | int | quote }}
{{- end }}
{{- end -}}
