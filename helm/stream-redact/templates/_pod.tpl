{{/* The worker pod, shared by the StatefulSet (cluster.mode static) and the Deployment (kafka).
     Indented for "spec.template" of either. */}}
{{- define "stream-redact.workerPod" }}
    metadata:
      labels:
        {{- include "stream-redact.selectorLabels" . | nindent 8 }}
        app.kubernetes.io/component: worker
        {{- with .Values.podLabels }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      annotations:
        checksum/config: {{ include "stream-redact.config" . | sha256sum }}
        {{- with .Values.podAnnotations }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
    spec:
      serviceAccountName: {{ include "stream-redact.serviceAccountName" . }}
      automountServiceAccountToken: false
      {{- with .Values.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- if and .Values.gpu.enabled .Values.gpu.runtimeClassName }}
      runtimeClassName: {{ .Values.gpu.runtimeClassName }}
      {{- end }}
      {{- with .Values.priorityClassName }}
      priorityClassName: {{ . }}
      {{- end }}
      securityContext:
        {{- toYaml .Values.podSecurityContext | nindent 8 }}
      terminationGracePeriodSeconds: {{ include "stream-redact.terminationGracePeriodSeconds" . }}
      containers:
        - name: stream-redact
          image: {{ include "stream-redact.image" . }}
          imagePullPolicy: {{ .Values.image.pullPolicy }}
          {{- if eq .Values.cluster.mode "kafka" }}
          # pipeline.workers stream worker processes (default 1), each a member of the consumer group
          # of its own, serving on service.port + 1 + i, where other pods send API callers to it
          args: ["run", "--config", "/etc/stream-redact/config.yaml", "--workers", "{{ include "stream-redact.clusterWorkers" . }}"]
          env:
            # the address other pods redirect API requests for this pod's streams to (cluster.advertise_url)
            - name: POD_IP
              valueFrom:
                fieldRef:
                  fieldPath: status.podIP
          {{- else }}
          args: ["run", "--config", "/etc/stream-redact/config.yaml"]
          env:
            - name: STREAM_REDACT_SHARD_INDEX
              value: auto
            - name: STREAM_REDACT_SHARD_COUNT
              value: {{ .Values.replicaCount | quote }}
          {{- end }}
            - name: STATE_DIRECTORY
              value: /var/lib/stream-redact
            {{- if .Values.auth.existingSecret }}
            - name: STREAM_REDACT_TOKENS
              valueFrom:
                secretKeyRef:
                  name: {{ .Values.auth.existingSecret }}
                  key: {{ .Values.auth.tokensKey }}
            {{- end }}
            {{- if and .Values.kafka.enabled (hasPrefix "SASL" .Values.kafka.securityProtocol) }}
            - name: KAFKA_SASL_PASSWORD
              valueFrom:
                secretKeyRef:
                  name: {{ .Values.kafka.sasl.existingSecret }}
                  key: {{ .Values.kafka.sasl.passwordKey }}
            {{- end }}
            {{- if and .Values.publishRedacted.enabled .Values.mediamtx.publisher.existingSecret }}
            - name: MEDIAMTX_USER
              valueFrom:
                secretKeyRef:
                  name: {{ .Values.mediamtx.publisher.existingSecret }}
                  key: username
            - name: MEDIAMTX_PASSWORD
              valueFrom:
                secretKeyRef:
                  name: {{ .Values.mediamtx.publisher.existingSecret }}
                  key: password
            {{- end }}
            {{- with .Values.extraEnv }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
          {{- with .Values.extraEnvFrom }}
          envFrom:
            {{- toYaml . | nindent 12 }}
          {{- end }}
          ports:
            - name: http
              containerPort: {{ .Values.service.port }}
              protocol: TCP
            {{- if and (eq .Values.cluster.mode "kafka") (gt (include "stream-redact.clusterWorkers" . | int) 1) }}
            {{- range $i := until (include "stream-redact.clusterWorkers" . | int) }}
            - name: worker-{{ $i }}
              containerPort: {{ add $.Values.service.port 1 $i }}
              protocol: TCP
            {{- end }}
            {{- end }}
          startupProbe:
            httpGet: {path: /healthz, port: http}
            periodSeconds: {{ .Values.probes.startup.periodSeconds }}
            failureThreshold: {{ .Values.probes.startup.failureThreshold }}
          livenessProbe:
            httpGet: {path: /healthz, port: http}
            periodSeconds: {{ .Values.probes.liveness.periodSeconds }}
            timeoutSeconds: {{ .Values.probes.liveness.timeoutSeconds }}
            failureThreshold: {{ .Values.probes.liveness.failureThreshold }}
          readinessProbe:
            httpGet: {path: /readyz, port: http}
            periodSeconds: {{ .Values.probes.readiness.periodSeconds }}
            timeoutSeconds: {{ .Values.probes.readiness.timeoutSeconds }}
            failureThreshold: {{ .Values.probes.readiness.failureThreshold }}
          securityContext:
            {{- toYaml .Values.securityContext | nindent 12 }}
          resources:
            {{- $res := deepCopy .Values.resources }}
            {{- if .Values.gpu.enabled }}
            {{- $limits := $res.limits | default dict }}
            {{- $_ := set $limits .Values.gpu.resourceName (int .Values.gpu.count) }}
            {{- $_ := set $res "limits" $limits }}
            {{- end }}
            {{- toYaml $res | nindent 12 }}
          volumeMounts:
            - name: config
              mountPath: /etc/stream-redact
              readOnly: true
            - name: state
              mountPath: /var/lib/stream-redact
            - name: tmp
              mountPath: /tmp
            - name: dshm
              mountPath: /dev/shm
            {{- if and .Values.kafka.enabled (hasSuffix "SSL" .Values.kafka.securityProtocol) .Values.kafka.tls.caSecret }}
            - name: kafka-tls
              mountPath: /etc/stream-redact/kafka-tls
              readOnly: true
            {{- end }}
      volumes:
        - name: config
          configMap:
            name: {{ include "stream-redact.fullname" . }}
        - name: tmp
          emptyDir: {sizeLimit: 1Gi}
        - name: dshm  # frame slots of pipeline.workers > 1: the runtime's default /dev/shm is 64 MiB
          emptyDir: {medium: Memory, sizeLimit: {{ .Values.sharedMemory }}}
        {{- if not .Values.persistence.enabled }}
        - name: state
          emptyDir: {sizeLimit: {{ .Values.persistence.size }}}
        {{- end }}
        {{- if and .Values.kafka.enabled (hasSuffix "SSL" .Values.kafka.securityProtocol) .Values.kafka.tls.caSecret }}
        - name: kafka-tls
          secret:
            secretName: {{ .Values.kafka.tls.caSecret }}
        {{- end }}
      {{- with .Values.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with .Values.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with .Values.affinity }}
      affinity:
        {{- toYaml . | nindent 8 }}
      {{- end }}
{{- end -}}
