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
{{- if eq .Values.cluster.mode "kafka" -}}
{{- $c := .Values.cluster -}}
{{- $_ := set $cfg "cluster" (dict "mode" "kafka" "group_id" $c.groupId "assignments_topic" $c.assignmentsTopic "streams_topic" $c.streamsTopic "members_topic" $c.membersTopic "advertise_url" (printf "http://${POD_IP}:%d" (int .Values.service.port)) "partitions" (int $c.partitions) "session_timeout_s" $c.sessionTimeoutS) -}}
{{- end -}}
{{- toYaml $cfg -}}
{{- end -}}


{{/* Grace period of a worker pod. kafka: on SIGTERM it stops its streams, then leaves the group so
     that the others start them at once; killed before that, its streams stay dark until the group
     gives up on it (cluster.sessionTimeoutS). */}}
{{- define "stream-redact.terminationGracePeriodSeconds" -}}
{{- if eq .Values.cluster.mode "kafka" -}}
{{- $session := int (ceil .Values.cluster.sessionTimeoutS) -}}
{{- $min := add $session 20 -}}
{{- $grace := int (.Values.cluster.terminationGracePeriodSeconds | default (add $session 50)) -}}
{{- if lt $grace (int $min) -}}
{{- fail (printf "cluster.terminationGracePeriodSeconds (%d) is shorter than cluster.sessionTimeoutS + 20 s (%d): a worker killed before it has stopped its streams and left the group leaves them dark for a further session timeout; set it to %d or more, or leave it empty for sessionTimeoutS + 50 s" $grace $min $min) -}}
{{- end -}}
{{- $grace -}}
{{- else -}}
{{- .Values.terminationGracePeriodSeconds -}}
{{- end -}}
{{- end -}}

{{/* cluster.mode kafka: stream worker processes per pod (pipeline.workers, default 1); each is a
     member of the consumer group of its own. */}}
{{- define "stream-redact.clusterWorkers" -}}
{{- if hasKey (.Values.pipeline | default dict) "workers" -}}
{{- .Values.pipeline.workers | int -}}
{{- else -}}
1
{{- end -}}
{{- end -}}

{{/* Values that only make sense together in cluster.mode kafka; each failure names the value to set. */}}
{{- define "stream-redact.checkCluster" -}}
{{- if eq .Values.cluster.mode "kafka" -}}
{{- $c := .Values.cluster -}}
{{- if not (and .Values.kafka.enabled .Values.kafka.bootstrapServers) -}}
{{- fail "cluster.mode kafka needs Kafka brokers, which the workers join a consumer group on: set kafka.enabled=true and kafka.bootstrapServers (e.g. [kafka-0.kafka:9092]), the same Kafka the events go to, or use cluster.mode static" -}}
{{- end -}}
{{- if .Values.persistence.enabled -}}
{{- fail "persistence.enabled needs cluster.mode static: in kafka mode the workers are a Deployment, which has no volume per pod; set persistence.enabled=false (the event spool is then an emptyDir of persistence.size)" -}}
{{- end -}}
{{- $workers := include "stream-redact.clusterWorkers" . | int -}}
{{- $most := ternary $c.autoscaling.maxReplicas .Values.replicaCount $c.autoscaling.enabled -}}
{{- $what := ternary "cluster.autoscaling.maxReplicas" "replicaCount" $c.autoscaling.enabled -}}
{{- if gt (mul (int $most) $workers) (int $c.partitions) -}}
{{- if eq $workers 1 -}}
{{- fail (printf "%s (%d) is more than cluster.partitions (%d): a worker without a partition of the assignments topic runs no stream; lower %s or raise cluster.partitions (before the topic is created: its partition count is fixed then)" $what (int $most) (int $c.partitions) $what) -}}
{{- else -}}
{{- fail (printf "%s (%d) x pipeline.workers (%d) = %d group members is more than cluster.partitions (%d): a worker process without a partition of the assignments topic runs no stream; lower %s or pipeline.workers, or raise cluster.partitions (before the topic is created: its partition count is fixed then)" $what (int $most) $workers (mul (int $most) $workers) (int $c.partitions) $what) -}}
{{- end -}}
{{- end -}}
{{- if and (eq (toString $c.rollingUpdate.maxSurge) "0") (eq (toString $c.rollingUpdate.maxUnavailable) "0") -}}
{{- fail "cluster.rollingUpdate.maxSurge and maxUnavailable are both 0, so no pod could ever be replaced; set maxSurge 1 (room for one more pod) or maxUnavailable 1" -}}
{{- end -}}
{{- if $c.autoscaling.enabled -}}
{{- if gt (int $c.autoscaling.minReplicas) (int $c.autoscaling.maxReplicas) -}}
{{- fail (printf "cluster.autoscaling.minReplicas (%d) is more than cluster.autoscaling.maxReplicas (%d); lower minReplicas or raise maxReplicas" (int $c.autoscaling.minReplicas) (int $c.autoscaling.maxReplicas)) -}}
{{- end -}}
{{- if not (and .Values.resources.requests (hasKey .Values.resources.requests "cpu")) -}}
{{- fail "cluster.autoscaling.enabled scales on CPU utilisation, which is measured against the pods' CPU request: set resources.requests.cpu" -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}
