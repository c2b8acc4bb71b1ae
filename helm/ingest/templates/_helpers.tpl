{{/*
Names, labels and the pieces every pod shares.
*/}}

{{- define "ingest.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* "<release>-<chart>", or the release alone when it already names the chart. */}}
{{- define "ingest.fullname" -}}
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

{{- define "ingest.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of every object. */}}
{{- define "ingest.labels" -}}
helm.sh/chart: {{ include "ingest.chart" . }}
{{ include "ingest.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: ingest
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "ingest.selectorLabels" -}}
app.kubernetes.io/name: {{ include "ingest.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Labels of one component's objects: (dict "root" $ "component" "consumer"). */}}
{{- define "ingest.componentLabels" -}}
{{ include "ingest.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "ingest.componentSelectorLabels" -}}
{{ include "ingest.selectorLabels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* The ServiceAccount name of a component: (dict "root" $ "component" "consumer"). */}}
{{- define "ingest.serviceAccountName" -}}
{{- $values := index .root.Values .component }}
{{- if $values.serviceAccount.create }}
{{- default (printf "%s-%s" (include "ingest.fullname" .root) .component) $values.serviceAccount.name }}
{{- else }}
{{- default "default" $values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "ingest.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* The environment every container has: region, logging, extra env. */}}
{{- define "ingest.commonEnv" -}}
- name: AWS_REGION
  value: {{ .Values.aws.region | quote }}
- name: RUST_LOG
  value: {{ .Values.logLevel | quote }}
- name: INGEST_LOG_FORMAT
  value: {{ .Values.logFormat | quote }}
{{- with .Values.env }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Where the database Secret is mounted, and its files. */}}
{{- define "ingest.databaseSecretDir" -}}/etc/ingest/database{{- end }}

{{/* The database flags of migrate, consume and status. */}}
{{- define "ingest.databaseArgs" -}}
- --database-url={{ required "database.url is required" .Values.database.url }}
- --database-password-file={{ include "ingest.databaseSecretDir" . }}/password
- --connect-timeout={{ .Values.database.connectTimeout }}
{{- with .Values.database.consulDns }}
- --consul-dns={{ . }}
{{- end }}
- --database-tls={{ .Values.database.tls }}
{{- if .Values.database.caKey }}
- --database-ca-file={{ include "ingest.databaseSecretDir" . }}/ca.crt
{{- end }}
{{- end }}

{{/* The database Secret as a volume: the password, and the CA when given. */}}
{{- define "ingest.databaseVolume" -}}
- name: database
  secret:
    secretName: {{ required "database.existingSecret is required: a Secret with the database password" .Values.database.existingSecret }}
    defaultMode: 0440
    items:
      - key: {{ .Values.database.passwordKey }}
        path: password
      {{- if .Values.database.caKey }}
      - key: {{ .Values.database.caKey }}
        path: ca.crt
      {{- end }}
{{- end }}

{{- define "ingest.databaseVolumeMount" -}}
- name: database
  mountPath: {{ include "ingest.databaseSecretDir" . }}
  readOnly: true
{{- end }}

{{/* Zone and host spread of a component: (dict "root" $ "component" "consumer"). */}}
{{- define "ingest.topologySpread" -}}
{{- $values := index .root.Values .component }}
{{- if $values.topologySpread.enabled }}
topologySpreadConstraints:
  {{- range list "topology.kubernetes.io/zone" "kubernetes.io/hostname" }}
  - maxSkew: {{ $values.topologySpread.maxSkew }}
    topologyKey: {{ . }}
    whenUnsatisfiable: {{ $values.topologySpread.whenUnsatisfiable }}
    labelSelector:
      matchLabels:
        {{- include "ingest.componentSelectorLabels" $ | nindent 8 }}
  {{- end }}
{{- end }}
{{- end }}

{{/* Scheduling settings of a component's pods. */}}
{{- define "ingest.scheduling" -}}
{{- $values := index .root.Values .component }}
{{- with $values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $values.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- end }}

{{/* The pod-level settings every pod of the chart has. */}}
{{- define "ingest.podSecurity" -}}
automountServiceAccountToken: false
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}
