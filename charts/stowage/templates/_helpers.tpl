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

{{/* Off-node backups (docs/backup.md): "true" when at least one target is configured; the
chart then requires the credentials Secret, the key Secret and a cluster ID. */}}
{{- define "stowage.backupEnabled" -}}
{{- if .Values.backup.targets -}}
{{- if not .Values.backup.credentialsSecret -}}{{- fail "backup.targets needs backup.credentialsSecret (a Secret with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)" -}}{{- end -}}
{{- if not .Values.backup.keySecret -}}{{- fail "backup.targets needs backup.keySecret (the repository key: backups are always encrypted)" -}}{{- end -}}
{{- if not .Values.backup.clusterId -}}{{- fail "backup.targets needs backup.clusterId (the owner recorded in every manifest; unique per cluster)" -}}{{- end -}}
true
{{- end -}}
{{- end -}}

{{/* The managed-by label value the controller's csi-snapshotter serves. */}}
{{- define "stowage.controllerIdentity" -}}
{{- default (printf "%s-controller" (include "stowage.fullname" .)) .Values.backup.controllerIdentity | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "stowage.backupKeyDir" -}}/etc/stowage/backup-key{{- end -}}

{{/* Driver flags for the backup targets (node and controller modes alike). */}}
{{- define "stowage.backupArgs" -}}
{{- range .Values.backup.targets }}
- --backup-target={{ .name }}={{ .url }}
{{- end }}
- --backup-key-file={{ include "stowage.backupKeyDir" . }}/{{ .Values.backup.keySecretKey }}
- --backup-cluster-id={{ .Values.backup.clusterId }}
{{- end -}}

{{/* The object store's credentials, from the Secret (never in the pod spec itself). */}}
{{- define "stowage.backupEnv" -}}
{{- range list "AWS_ACCESS_KEY_ID" "AWS_SECRET_ACCESS_KEY" }}
- name: {{ . }}
  valueFrom:
    secretKeyRef:
      name: {{ $.Values.backup.credentialsSecret }}
      key: {{ . }}
{{- end }}
{{- end -}}

{{- define "stowage.backupKeyMount" -}}
- name: backup-key
  mountPath: {{ include "stowage.backupKeyDir" . }}
  readOnly: true
{{- end -}}

{{/* 0440: the controller pod reads it as its non-root fsGroup. */}}
{{- define "stowage.backupKeyVolume" -}}
- name: backup-key
  secret:
    secretName: {{ .Values.backup.keySecret }}
    defaultMode: 0440
    items:
      - key: {{ .Values.backup.keySecretKey }}
        path: {{ .Values.backup.keySecretKey }}
{{- end -}}

{{/* The annotations of an object whose kind comes from a CRD this release may install (the
snapshot classes): a post-install/post-upgrade hook. helm maps every manifest resource before it
creates any, so such an object next to its CRD fails `helm install` ("no matches for kind"); a
hook is mapped after the release's resources exist. Hooks stay on `helm uninstall` (like the
CRDs) and are replaced on the next install. */}}
{{- define "stowage.afterCRDsHook" -}}
helm.sh/hook: post-install,post-upgrade
helm.sh/hook-delete-policy: before-hook-creation
{{- end -}}
