{{/*
Names
*/}}
{{- define "feedloop.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "feedloop.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* Name of one component's objects. Usage: include "feedloop.componentName" (list $ "api") */}}
{{- define "feedloop.componentName" -}}
{{- $ctx := index . 0 -}}
{{- printf "%s-%s" (include "feedloop.fullname" $ctx | trunc (int (sub 62 (len (index . 1))))) (index . 1) | trimSuffix "-" }}
{{- end }}

{{- define "feedloop.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels. Every object gets the common labels; a component's objects add app.kubernetes.io/component.
Usage: include "feedloop.labels" (list $ "api")  /  include "feedloop.selectorLabels" (list $ "api")
*/}}
{{- define "feedloop.labels" -}}
{{- $ctx := index . 0 -}}
helm.sh/chart: {{ include "feedloop.chart" $ctx }}
{{ include "feedloop.selectorLabels" . }}
app.kubernetes.io/version: {{ $ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ $ctx.Release.Service }}
app.kubernetes.io/part-of: feedloop
{{- end }}

{{- define "feedloop.selectorLabels" -}}
{{- $ctx := index . 0 -}}
app.kubernetes.io/name: {{ include "feedloop.name" $ctx }}
app.kubernetes.io/instance: {{ $ctx.Release.Name }}
{{- if gt (len .) 1 }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}
{{- end }}

{{/* Label of the pods allowed to reach the built-in Redis (see networkpolicy-redis.yaml). */}}
{{- define "feedloop.redisClientLabel" -}}
feedloop.io/redis-client: "true"
{{- end }}

{{- define "feedloop.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "feedloop.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
Image of a component: its own override, else the CPU or GPU image.
Usage: include "feedloop.image" (list $ .Values.api.image (gt (int .Values.api.gpus) 0))
*/}}
{{- define "feedloop.image" -}}
{{- $ctx := index . 0 -}}
{{- $override := index . 1 | default dict -}}
{{- $gpu := index . 2 -}}
{{- $repository := $override.repository | default $ctx.Values.image.repository -}}
{{- $defaultTag := ternary
      ($ctx.Values.image.gpuTag | default (printf "%s-gpu" $ctx.Chart.AppVersion))
      ($ctx.Values.image.cpuTag | default (printf "%s-cpu" $ctx.Chart.AppVersion))
      $gpu }}
{{- printf "%s:%s" $repository ($override.tag | default $defaultTag) }}
{{- end }}

{{/*
Resources with the GPU count added to requests and limits.
Usage: include "feedloop.resources" (list $ .Values.trainer.resources .Values.trainer.gpus)
*/}}
{{- define "feedloop.resources" -}}
{{- $ctx := index . 0 -}}
{{- $resources := deepCopy (index . 1 | default dict) -}}
{{- $gpus := int (index . 2) -}}
{{- if gt $gpus 0 }}
{{- $gpu := dict $ctx.Values.gpu.resourceName $gpus -}}
{{- $_ := set $resources "requests" (merge (deepCopy $gpu) ($resources.requests | default dict)) }}
{{- $_ := set $resources "limits" (merge (deepCopy $gpu) ($resources.limits | default dict)) -}}
{{- end }}
{{- toYaml $resources }}
{{- end }}

{{/* Scheduling and security fields shared by every feedloop pod. Usage: include "feedloop.podCommon" (list $ .Values.api) */}}
{{- define "feedloop.podCommon" -}}
{{- $ctx := index . 0 -}}
{{- $spec := index . 1 -}}
serviceAccountName: {{ include "feedloop.serviceAccountName" $ctx }}
automountServiceAccountToken: false
{{- with $ctx.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $ctx.Values.podSecurityContext }}
securityContext:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $spec.priorityClassName }}
priorityClassName: {{ . | quote }}
{{- end }}
{{- with $spec.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $spec.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $spec.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $spec.topologySpreadConstraints }}
topologySpreadConstraints:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* Pod annotations: the user's, plus a checksum of the settings so that a settings change rolls the pods. */}}
{{- define "feedloop.podAnnotations" -}}
{{- $ctx := index . 0 -}}
checksum/config: {{ include (print $ctx.Template.BasePath "/configmap.yaml") $ctx | sha256sum }}
{{- with index . 1 }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Secrets
*/}}
{{- define "feedloop.secretName" -}}
{{- .Values.secrets.existingSecret | default (printf "%s-secrets" (include "feedloop.fullname" .)) }}
{{- end }}

{{- define "feedloop.redisExternal" -}}
{{- if or .Values.redis.external.url .Values.redis.external.existingSecret }}true{{ end }}
{{- end }}

{{- define "feedloop.redisHost" -}}
{{- include "feedloop.componentName" (list . "redis") }}
{{- end }}

{{/* The Secret and key holding REDIS_URL. */}}
{{- define "feedloop.redisUrlSecretRef" -}}
{{- if .Values.redis.external.existingSecret -}}
name: {{ .Values.redis.external.existingSecret }}
key: {{ .Values.redis.external.existingSecretKey }}
{{- else -}}
name: {{ include "feedloop.secretName" . }}
key: redis-url
{{- end }}
{{- end }}

{{/*
A secret value: the one given, else the one already in the release's Secret (kept across upgrades), else a new
random one. Usage: include "feedloop.secretValue" (list $ "admin-token" .Values.secrets.adminToken)
*/}}
{{- define "feedloop.secretValue" -}}
{{- $ctx := index . 0 -}}
{{- $key := index . 1 -}}
{{- $given := index . 2 -}}
{{- if $given }}
{{- $given }}
{{- else }}
{{- $existing := lookup "v1" "Secret" $ctx.Release.Namespace (include "feedloop.secretName" $ctx) -}}
{{- if and $existing $existing.data (hasKey $existing.data $key) }}
{{- index $existing.data $key | b64dec }}
{{- else }}
{{- randAlphaNum 40 }}
{{- end }}
{{- end }}
{{- end }}

{{/* Environment every role needs: the Redis URL from its Secret. */}}
{{- define "feedloop.redisEnv" -}}
- name: REDIS_URL
  valueFrom:
    secretKeyRef:
      {{- include "feedloop.redisUrlSecretRef" . | nindent 6 }}
{{- end }}

{{/*
Volumes
*/}}
{{- define "feedloop.adapterClaimName" -}}
{{- .Values.adapterStorage.existingClaim | default (include "feedloop.componentName" (list . "adapters")) }}
{{- end }}

{{- define "feedloop.adapterVolume" -}}
- name: shared-data
  {{- if or .Values.adapterStorage.create .Values.adapterStorage.existingClaim }}
  persistentVolumeClaim:
    claimName: {{ include "feedloop.adapterClaimName" . }}
  {{- else }}
  emptyDir: {}
  {{- end }}
{{- end }}

{{- define "feedloop.modelVolume" -}}
{{- with .Values.model.volume }}
- name: model
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{- define "feedloop.modelVolumeMount" -}}
{{- if .Values.model.volume }}
- name: model
  mountPath: {{ .Values.model.path }}
  readOnly: true
{{- end }}
{{- end }}

{{/*
Bytes of a Kubernetes quantity or a redis.conf size: 4Gi, 4096Mi, 4G, 4gb, 3000mb, 512m, 1024 (0 when empty).
Kubernetes Mi/Gi and redis mb/gb are powers of 1024; M/G and m/g powers of 1000.
*/}}
{{- define "feedloop.bytes" -}}
{{- $value := toString . | trim -}}
{{- if not $value -}}0{{- else -}}
{{- $number := regexFind "^[0-9]+" $value | atoi -}}
{{- $unit := regexReplaceAll "^[0-9]+" $value "" | lower -}}
{{- $scale := dict "" 1 "k" 1000 "kb" 1024 "ki" 1024 "m" 1000000 "mb" 1048576 "mi" 1048576 "g" 1000000000 "gb" 1073741824 "gi" 1073741824 -}}
{{- if not (hasKey $scale $unit) -}}{{- fail (printf "cannot read the size %q" $value) -}}{{- end -}}
{{- mul $number (get $scale $unit) -}}
{{- end -}}
{{- end -}}

{{/*
maxmemory of the built-in Redis: redis.maxmemory, else 75% of the container's memory limit (the rest is for
the AOF rewrite's fork, client buffers and fragmentation, so that noeviction refuses writes before the
kernel OOM-kills Redis). Empty when neither is set. Fails when maxmemory is not below the limit.
*/}}
{{- define "feedloop.redisMaxmemory" -}}
{{- $limit := include "feedloop.bytes" (dig "limits" "memory" "" .Values.redis.resources) | atoi -}}
{{- $maxmemory := toString .Values.redis.maxmemory | trim -}}
{{- if and $maxmemory $limit (ge (include "feedloop.bytes" $maxmemory | atoi) $limit) -}}
{{- fail (printf "redis.maxmemory (%s) must be below redis.resources.limits.memory (%s), or Redis is OOM-killed instead of refusing writes; leave it empty for 75%% of the limit" $maxmemory (dig "limits" "memory" "" .Values.redis.resources)) -}}
{{- end -}}
{{- if $maxmemory -}}{{ $maxmemory }}{{- else if $limit -}}{{ div (mul $limit 3) (mul 4 1048576) }}mb{{- end -}}
{{- end -}}
