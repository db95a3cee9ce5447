{{/* Base name of every object: the release name if it already says keybrake. */}}
{{- define "keybrake.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default "keybrake" .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "keybrake.controllerName" -}}{{ include "keybrake.fullname" . }}-controller{{- end -}}
{{- define "keybrake.webhookServiceName" -}}{{ include "keybrake.fullname" . }}-webhook{{- end -}}
{{- define "keybrake.webhookConfigName" -}}{{ include "keybrake.fullname" . }}-sidecar-injector{{- end -}}
{{- define "keybrake.tlsSecretName" -}}{{ default (printf "%s-tls" (include "keybrake.fullname" .)) .Values.tls.secretName }}{{- end -}}
{{- define "keybrake.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "keybrake.controllerName" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The URL sidecars dial: the headless Service, so every replica takes streams. */}}
{{- define "keybrake.controllerURL" -}}
https://{{ include "keybrake.controllerName" . }}.{{ .Release.Namespace }}.svc:{{ .Values.controller.ports.streams }}
{{- end -}}

{{- define "keybrake.labels" -}}
app.kubernetes.io/name: keybrake
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "keybrake.controllerSelector" -}}
app.kubernetes.io/name: keybrake
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: controller
{{- end -}}

{{- define "keybrake.image" -}}
{{- printf "%s:%s" .image.repository (default .chart.AppVersion .image.tag) -}}
{{- end -}}

{{/* The controller runs as a StatefulSet when each replica keeps its own SQLite file. */}}
{{- define "keybrake.workloadKind" -}}
{{- if eq .Values.audit.sink "sqlite" -}}StatefulSet{{- else -}}Deployment{{- end -}}
{{- end -}}
