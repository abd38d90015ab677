{{/* Chart name. */}}
{{- define "batchserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Resource name prefix. Kept short: KubeRay appends suffixes to the RayService name. */}}
{{- define "batchserve.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Selector labels shared by every pod of the release. */}}
{{- define "batchserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "batchserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Labels of every resource. */}}
{{- define "batchserve.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "batchserve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: batchserve
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* The pinned application image. */}}
{{- define "batchserve.image" -}}
{{- if or (not .Values.image.tag) (eq (toString .Values.image.tag) "latest") -}}
{{- fail "image.tag must be a pinned version, never empty or latest" -}}
{{- end -}}
{{- printf "%s:%s" .Values.image.repository (toString .Values.image.tag) -}}
{{- end -}}

{{- define "batchserve.tenantsSecretName" -}}
{{- default (printf "%s-tenants" (include "batchserve.fullname" .)) .Values.tenants.existingSecret -}}
{{- end -}}

{{- define "batchserve.modelCacheClaimName" -}}
{{- default (printf "%s-model-cache" (include "batchserve.fullname" .)) .Values.modelCache.pvc.existingClaim -}}
{{- end -}}

{{- define "batchserve.redisName" -}}
{{- printf "%s-redis" (include "batchserve.fullname" .) -}}
{{- end -}}

{{- define "batchserve.redisAuthSecretName" -}}
{{- default (printf "%s-redis-auth" (include "batchserve.fullname" .)) .Values.redis.auth.existingSecret -}}
{{- end -}}

{{/*
The Redis URL the application gets: the in-chart Redis, the external one, or nothing. The in-chart
one goes without its password; the Ray pods get the full URL from the Secret (batchserve.rayEnv).
*/}}
{{- define "batchserve.redisUrl" -}}
{{- if .Values.redis.enabled -}}
{{- printf "redis://%s.%s.svc:%d/0" (include "batchserve.redisName" .) .Release.Namespace (int .Values.redis.port) -}}
{{- else if .Values.redis.externalUrl -}}
{{- .Values.redis.externalUrl -}}
{{- end -}}
{{- end -}}

{{/*
The Serve config (serveConfigV2 of the RayService; also deploy/serve-config.yaml, generated from
this by `make chart-sync`). `args` are serve/settings.py Settings fields.
*/}}
{{- define "batchserve.serveConfig" -}}
{{- $args := deepCopy .Values.serve.settings -}}
{{- $_ := set $args "cache_dir" .Values.modelCache.mountPath -}}
{{- if .Values.tenants.enabled -}}
{{- $_ := set $args "tenants_file" (printf "%s/%s" .Values.tenants.mountPath .Values.tenants.key) -}}
{{- end -}}
{{- /* Per pod (the /tmp emptyDir): SQLite in WAL mode needs a local filesystem. */ -}}
{{- $_ := set $args "usage_ledger_path" "/tmp/batchserve/usage.sqlite3" -}}
{{- $redisUrl := include "batchserve.redisUrl" . -}}
{{- /* The in-chart Redis: BATCHSERVE_REDIS_URL (with the password) from the pods' environment. */ -}}
{{- if and $redisUrl (not .Values.redis.enabled) -}}
{{- $_ := set $args "redis_url" $redisUrl -}}
{{- end -}}
{{- $maxReplicas := int (default 1 (index .Values.serve.settings.models 0).replicas) -}}
{{- if .Values.serve.autoscaling.enabled -}}
{{- $maxReplicas = int .Values.serve.autoscaling.maxReplicas -}}
{{- end -}}
{{- if and (gt $maxReplicas 1) (not $redisUrl) -}}
{{- fail "more than one Serve replica needs Redis (redis.enabled or redis.externalUrl): without it tenant limits are per replica and each pod keeps its own usage ledger" -}}
{{- end -}}
{{- $deployment := dict "name" .Values.serve.deploymentName -}}
{{- with .Values.serve.autoscaling -}}
{{- if .enabled -}}
{{- if gt (int .minReplicas) (int .maxReplicas) -}}
{{- fail "serve.autoscaling.minReplicas must not exceed maxReplicas" -}}
{{- end -}}
{{- $_ := set $deployment "num_replicas" "auto" -}}
{{- $_ := set $deployment "autoscaling_config" (dict "min_replicas" (int .minReplicas) "max_replicas" (int .maxReplicas) "target_ongoing_requests" .targetOngoingRequests "upscale_delay_s" .upscaleDelayS "downscale_delay_s" .downscaleDelayS) -}}
{{- end -}}
{{- end -}}
{{- $app := dict "name" .Values.serve.appName "import_path" .Values.serve.importPath "route_prefix" .Values.serve.routePrefix "args" $args "deployments" (list $deployment) -}}
{{- $config := dict "proxy_location" "EveryNode" "http_options" (dict "host" "0.0.0.0" "port" (int .Values.serve.port)) "applications" (list $app) -}}
{{- toYaml $config -}}
{{- end -}}

{{/* Settings.engine_slots from the values: min(max_inflight_per_replica, the served
model's max_num_seqs). Absent keys take the Settings defaults. */}}
{{- define "batchserve.engineSlots" -}}
{{- $s := .Values.serve.settings -}}
{{- $engine := (index $s.models 0).engine | default dict -}}
{{- $inflight := ternary (index $s "max_inflight_per_replica") 256 (hasKey $s "max_inflight_per_replica") -}}
{{- $seqs := ternary (index $engine "max_num_seqs") 256 (hasKey $engine "max_num_seqs") -}}
{{- min (int $inflight) (int $seqs) -}}
{{- end -}}

{{/* A setting from the values, or its Settings default when absent (hasKey: `default`
would take 0 for absent). Call with (list .Values.serve.settings "key" default). */}}
{{- define "batchserve.setting" -}}
{{- $s := index . 0 -}}
{{- $key := index . 1 -}}
{{- ternary (index $s $key) (index . 2) (hasKey $s $key) -}}
{{- end -}}

{{/* Settings.ingress_server_maxconn from the values: engine slots + queue_max_total +
ingress_headroom; 0 when shedding is off. */}}
{{- define "batchserve.ingressMaxconn" -}}
{{- $s := .Values.serve.settings -}}
{{- if and (hasKey $s "ingress_shedding") (not $s.ingress_shedding) -}}
0
{{- else -}}
{{- $queue := include "batchserve.setting" (list $s "queue_max_total" 256) -}}
{{- $headroom := include "batchserve.setting" (list $s "ingress_headroom" 16) -}}
{{- add (int (include "batchserve.engineSlots" .)) (int $queue) (int $headroom) -}}
{{- end -}}
{{- end -}}

{{/* Settings.ingress_tenant_maxconn from the values: engine slots - reserved slots
(min(queue_reserved_slots, slots - 1), or slots / 16 when unset) + queue_max_per_tenant +
ingress_headroom; 0 when shedding is off. */}}
{{- define "batchserve.ingressTenantMaxconn" -}}
{{- $s := .Values.serve.settings -}}
{{- if and (hasKey $s "ingress_shedding") (not $s.ingress_shedding) -}}
0
{{- else -}}
{{- $slots := int (include "batchserve.engineSlots" .) -}}
{{- $reserved := div $slots 16 -}}
{{- if and (hasKey $s "queue_reserved_slots") (not (kindIs "invalid" $s.queue_reserved_slots)) -}}
{{- $reserved = min (int $s.queue_reserved_slots) (sub $slots 1) -}}
{{- end -}}
{{- $queue := include "batchserve.setting" (list $s "queue_max_per_tenant" 64) -}}
{{- $headroom := include "batchserve.setting" (list $s "ingress_headroom" 16) -}}
{{- add (sub $slots $reserved) (int $queue) (int $headroom) -}}
{{- end -}}
{{- end -}}

{{/* Ray CPUs of a pod: rayStartParams num-cpus, else (as KubeRay does) the container's CPU
limit, else its request; a Kubernetes quantity ("2", "500m") as a float. Args: (rayStartParams,
resources). */}}
{{- define "batchserve.rayCpus" -}}
{{- $params := index . 0 | default dict -}}
{{- $res := index . 1 | default dict -}}
{{- $q := "" -}}
{{- if hasKey $params "num-cpus" -}}
{{- $q = index $params "num-cpus" -}}
{{- else if and $res.limits (hasKey $res.limits "cpu") -}}
{{- $q = $res.limits.cpu -}}
{{- else if and $res.requests (hasKey $res.requests "cpu") -}}
{{- $q = $res.requests.cpu -}}
{{- end -}}
{{- $q = toString $q -}}
{{- if hasSuffix "m" $q -}}
{{- divf (float64 (trimSuffix "m" $q)) 1000 -}}
{{- else -}}
{{- float64 (default "0" $q) -}}
{{- end -}}
{{- end -}}

{{/* Most Serve replicas one Ray pod can host: the deployment's replicas (maxReplicas when
autoscaling), fewer when the pod's GPUs or CPUs (Ray's view) run out first. Args: (root, cpus,
gpus). */}}
{{- define "batchserve.replicasPerPod" -}}
{{- $root := index . 0 -}}
{{- $cpus := float64 (index . 1) -}}
{{- $gpus := float64 (index . 2) -}}
{{- $model := index $root.Values.serve.settings.models 0 -}}
{{- $n := float64 (default 1 $model.replicas) -}}
{{- if $root.Values.serve.autoscaling.enabled -}}
{{- $n = float64 $root.Values.serve.autoscaling.maxReplicas -}}
{{- end -}}
{{- $needGpus := float64 (ternary $model.num_gpus 1 (hasKey $model "num_gpus")) -}}
{{- $needCpus := float64 (ternary $model.num_cpus 1 (hasKey $model "num_cpus")) -}}
{{- if gt $needGpus 0.0 -}}
{{- $n = minf $n (floor (divf $gpus $needGpus)) -}}
{{- end -}}
{{- if gt $needCpus 0.0 -}}
{{- $n = minf $n (floor (divf $cpus $needCpus)) -}}
{{- end -}}
{{- int $n -}}
{{- end -}}

{{/* Replicas the head pod can host (0 with the default num-cpus "0"). */}}
{{- define "batchserve.headReplicas" -}}
{{- $params := .Values.head.rayStartParams | default dict -}}
{{- $cpus := include "batchserve.rayCpus" (list $params .Values.head.resources) -}}
{{- $gpus := 0.0 -}}
{{- if hasKey $params "num-gpus" -}}
{{- $gpus = float64 (index $params "num-gpus") -}}
{{- end -}}
{{- include "batchserve.replicasPerPod" (list . $cpus $gpus) -}}
{{- end -}}

{{/* Replicas one worker pod can host. */}}
{{- define "batchserve.workerReplicas" -}}
{{- $params := .Values.worker.rayStartParams | default dict -}}
{{- $cpus := include "batchserve.rayCpus" (list $params .Values.worker.resources) -}}
{{- $gpus := float64 .Values.worker.gpusPerPod -}}
{{- if hasKey $params "num-gpus" -}}
{{- $gpus = float64 (index $params "num-gpus") -}}
{{- end -}}
{{- include "batchserve.replicasPerPod" (list . $cpus $gpus) -}}
{{- end -}}

{{/* The replica ports of a Ray pod, as JSON {"ports": [{"name", "port"}]}: Serve's direct-ingress
range, monitoring.replicaMetricsPortCount ports from monitoring.replicaMetricsPort (none when
that is 0). Names `replica`, `replica-1`, ... (container port names: at most 15 characters). */}}
{{- define "batchserve.replicaPorts" -}}
{{- $first := int .Values.monitoring.replicaMetricsPort -}}
{{- $count := int .Values.monitoring.replicaMetricsPortCount -}}
{{- $ports := list -}}
{{- if gt $first 0 -}}
{{- if gt (add $first $count -1) 65535 -}}
{{- fail (printf "monitoring.replicaMetricsPort %d + replicaMetricsPortCount %d runs past port 65535" $first $count) -}}
{{- end -}}
{{- $hosted := max (int (include "batchserve.workerReplicas" .)) (int (include "batchserve.headReplicas" .)) -}}
{{- if lt $count (mul 2 $hosted) -}}
{{- fail (printf "monitoring.replicaMetricsPortCount (%d) must be at least twice the Serve replicas one Ray pod can host (%d): Serve gives each replica of a pod its own port from that range, and in a rolling update each replacement needs a new one while its predecessor's is quarantined (150 s); a replica finding none fails to start" $count $hosted) -}}
{{- end -}}
{{- range $i := until $count -}}
{{- $ports = append $ports (dict "name" (ternary "replica" (printf "replica-%d" $i) (eq $i 0)) "port" (add $first $i)) -}}
{{- end -}}
{{- end -}}
{{- dict "ports" $ports | toJson -}}
{{- end -}}

{{/* Environment of every Ray container. */}}
{{- define "batchserve.rayEnv" -}}
# Serve's direct ingress: HAProxy sends HTTP straight to the replica's own app (no proxy-actor hop).
- name: RAY_SERVE_ENABLE_HA_PROXY
  value: "1"
# Serve echoes a client's x-request-id itself: our middleware sanitises it first.
- name: RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH
  value: serve.gateway.serve_http:serve_http_middlewares
{{- if gt (int .Values.monitoring.replicaMetricsPort) 0 }}
# Replicas' own HTTP ports (their /metrics): Serve hands each new replica the lowest port of
# [MIN, MAX) on its node not in use and not quarantined (150 s after its replica stopped), so
# the first replica of a pod gets MIN. Bounded to the ports the pods declare and Prometheus
# scrapes (monitoring.replicaMetricsPortCount; Ray's own default is 1000 ports).
- name: RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT
  value: {{ .Values.monitoring.replicaMetricsPort | int | toString | quote }}
- name: RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT
  value: {{ add .Values.monitoring.replicaMetricsPort .Values.monitoring.replicaMetricsPortCount | int | toString | quote }}
{{- end }}
# Load shedding at HAProxy (serve/ingress.py): requests one replica is handed at once, and
# one tenant per replica up, as Settings.ingress_server_maxconn / ingress_tenant_maxconn
# compute them (0: no limit).
- name: BATCHSERVE_HAPROXY_SERVER_MAXCONN
  value: {{ include "batchserve.ingressMaxconn" . | quote }}
- name: BATCHSERVE_HAPROXY_TENANT_MAXCONN
  value: {{ include "batchserve.ingressTenantMaxconn" . | quote }}
# `/metrics` through the gateway Service and Ingress (HAProxy): only with public_metrics true,
# else answered 404/7003 there (serve/ingress.py); Prometheus scrapes the replicas' own ports.
- name: BATCHSERVE_HAPROXY_PUBLIC_METRICS
  value: {{ include "batchserve.setting" (list .Values.serve.settings "public_metrics" false) | quote }}
# A client that stopped reading: Serve's HTTP servers end its request (serve/gateway/serve_http.py),
# and HAProxy's `timeout client` (whole seconds, rounded up) ends its connection (serve/ingress.py).
{{- $stall := include "batchserve.setting" (list .Values.serve.settings "stream_stall_s" 30) }}
- name: BATCHSERVE_STREAM_STALL_S
  value: {{ $stall | quote }}
- name: RAY_SERVE_HAPROXY_TIMEOUT_CLIENT_S
  value: {{ max 1 (ceil (float64 $stall)) | int | toString | quote }}
{{- if .Values.redis.enabled }}
# The in-chart Redis with its password (from the Secret; Kubernetes expands $(REDIS_PASSWORD)).
- name: REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "batchserve.redisAuthSecretName" . }}
      key: {{ .Values.redis.auth.key }}
- name: BATCHSERVE_REDIS_URL
  value: {{ printf "redis://:$(REDIS_PASSWORD)@%s" (include "batchserve.redisUrl" . | trimPrefix "redis://") | quote }}
{{- end }}
- name: HOME
  value: /tmp/home
- name: XDG_CACHE_HOME
  value: /tmp/cache
- name: HF_HOME
  value: {{ printf "%s/huggingface" .Values.modelCache.mountPath | quote }}
{{- if eq .Values.serve.settings.profile "cpu" }}
- name: VLLM_CPU_KVCACHE_SPACE
  value: {{ default 2 .Values.serve.settings.cpu_kv_cache_gib | int | toString | quote }}
{{- end }}
{{- with .Values.hfToken.existingSecret }}
# Optional: only gated weights need it (README: "gated weights only"); a missing Secret must
# not keep every Ray pod in CreateContainerConfigError.
- name: HF_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $.Values.hfToken.key }}
      optional: true
{{- end }}
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Pod-level settings shared by head and workers. */}}
{{- define "batchserve.podCommon" -}}
terminationGracePeriodSeconds: {{ .Values.terminationGracePeriodSeconds }}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}
