{{/* The CSI driver name is fixed: it is what the driver reports in GetPluginInfo. */}}
{{- define "stowage.driverName" -}}stowage.csi.io{{- end -}}

{{/* The socket every container of a pod shares (driver --endpoint, sidecars --csi-address). */}}
{{- define "stowage.socketDir" -}}/csi{{- end -}}
{{- define "stowage.socketPath" -}}/csi/csi.sock{{- end -}}
{{- define "stowage.endpoint" -}}unix:///csi/csi.sock{{- end -}}

{{/* Host directory kubelet looks in for the driver's socket, and the registration path. */}}
{{- define "stowage.pluginDir" -}}{{ trimSuffix "/" .Values.kubeletDir }}/plugins/{{ include "stowage.driverName" . }}{{- end -}}
{{- define "stowage.registrationPath" -}}{{ include "stowage.pluginDir" . }}/csi.sock{{- end -}}

{{- define "stowage.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "stowage.fullname" -}}
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

{{- define "stowage.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "stowage.labels" -}}
helm.sh/chart: {{ include "stowage.chart" . }}
app.kubernetes.io/name: {{ include "stowage.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: stowage
{{- end -}}

{{/* Selector labels of one component: call with (dict "ctx" $ "component" "node"). */}}
{{- define "stowage.selectorLabels" -}}
app.kubernetes.io/name: {{ include "stowage.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "stowage.componentLabels" -}}
{{ include "stowage.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "stowage.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "stowage.sidecarImage" -}}
{{- printf "%s:%s" .repository .tag -}}
{{- end -}}

{{/* The port of a host:port metrics address ("0.0.0.0:9810" -> 9810). */}}
{{- define "stowage.addressPort" -}}
{{- $parts := splitList ":" . -}}
{{- last $parts -}}
{{- end -}}

{{- define "stowage.controllerLeaderElection" -}}
{{- if gt (int .Values.controller.replicas) 1 -}}true{{- end -}}
{{- end -}}

{{- define "stowage.snapshotControllerEnabled" -}}
{{- if .Values.snapshotController.enabled -}}true{{- end -}}
{{- end -}}

{{/* Hardened securityContext for containers that need no privileges. */}}
{{- define "stowage.restrictedContainer" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* Node-pod sidecars: root (the driver's socket and kubelet's plugins_registry are
     root-owned) but unprivileged, no capabilities, read-only root filesystem. */}}
{{- define "stowage.nodeSidecarSecurity" -}}
runAsUser: 0
runAsNonRoot: false
{{ include "stowage.restrictedContainer" . }}
{{- end -}}
