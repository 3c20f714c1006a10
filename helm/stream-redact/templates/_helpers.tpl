{{/* Names and labels. */}}
{{- define "stream-redact.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Release-qualified name; short enough that "<name>-<ordinal>" stays a valid pod host name. */}}
{{- define "stream-redact.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 52 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 52 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "stream-redact.selectorLabels" -}}
app.kubernetes.io/name: {{ include "stream-redact.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "stream-redact.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "stream-redact.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: stream-redact
{{- end -}}

{{- define "stream-redact.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "stream-redact.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "stream-redact.image" -}}
{{- $tag := .Values.image.tag | default (printf "%s-%s" .Chart.AppVersion (ternary "gpu" "cpu" .Values.gpu.enabled)) -}}
{{- printf "%s:%s" .Values.image.repository $tag -}}
{{- end -}}

{{/* rtsp://host:port of the media server the redacted streams are published to. */}}
{{- define "stream-redact.mediamtxUrl" -}}
{{- if .Values.mediamtx.enabled -}}
{{- printf "rtsp://%s-mediamtx:%d" (include "stream-redact.fullname" .) (int .Values.mediamtx.service.rtspPort) -}}
{{- else -}}
{{- required "mediamtx.externalUrl is required when mediamtx.enabled is false and publishRedacted.enabled is true" .Values.mediamtx.externalUrl | trimSuffix "/" -}}
{{- end -}}
{{- end -}}

{{/* The pipeline config (stream-redact run --config): values.pipeline + streams + what the chart owns. */}}
{{- define "stream-redact.config" -}}
{{- $cfg := deepCopy (.Values.pipeline | default dict) -}}
{{- $streams := list -}}
{{- range .Values.streams -}}
{{- $s := deepCopy . -}}
{{- if $.Values.publishRedacted.enabled -}}
{{- $base := include "stream-redact.mediamtxUrl" $ -}}
{{- if $.Values.mediamtx.publisher.existingSecret -}}
{{- $base = replace "rtsp://" "rtsp://${MEDIAMTX_USER}:${MEDIAMTX_PASSWORD}@" $base -}}
{{- end -}}
{{- $out := dict "type" "rtsp" "url" (printf "%s/%s%s" $base $.Values.publishRedacted.pathPrefix $s.id) -}}
{{- $_ := set $s "outputs" (append ($s.outputs | default list) $out) -}}
{{- end -}}
{{- $streams = append $streams $s -}}
{{- end -}}
{{- $_ := set $cfg "streams" $streams -}}
{{- $_ := set $cfg "http" (dict "host" "0.0.0.0" "port" (int .Values.service.port)) -}}
{{- $_ := set $cfg "auth" (dict "tokens_env" "STREAM_REDACT_TOKENS") -}}
{{- $spool := dict "dir" "/var/lib/stream-redact/spool" "max_bytes" (int64 .Values.events.spool.maxBytes) -}}
{{- $events := dict "spool" $spool -}}
{{- if .Values.kafka.enabled -}}
{{- $k := dict "bootstrap_servers" .Values.kafka.bootstrapServers "topic" .Values.kafka.topic "security_protocol" .Values.kafka.securityProtocol -}}
{{- if hasPrefix "SASL" .Values.kafka.securityProtocol -}}
{{- $_ := set $k "sasl" (dict "mechanism" .Values.kafka.sasl.mechanism "username" .Values.kafka.sasl.username "password_env" "KAFKA_SASL_PASSWORD") -}}
{{- end -}}
{{- if and (hasSuffix "SSL" .Values.kafka.securityProtocol) .Values.kafka.tls.caSecret -}}
{{- $_ := set $k "ssl" (dict "ca_file" (printf "/etc/stream-redact/kafka-tls/%s" .Values.kafka.tls.caKey)) -}}
{{- end -}}
{{- $_ := set $events "kafka" $k -}}
{{- else -}}
{{- $_ := set $events "sink" "jsonl" -}}
{{- $_ := set $events "jsonl" (dict "path" "/var/lib/stream-redact/events.jsonl") -}}
{{- end -}}
{{- $_ := set $cfg "events" $events -}}
{{- toYaml $cfg -}}
{{- end -}}
