{{/* Name of every object of the release; cluster-scoped ones carry it too, so releases differ. */}}
{{- define "templatecache.fullname" -}}
{{- if contains "templatecache" .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-templatecache" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "templatecache.labels" -}}
app.kubernetes.io/name: templatecache-operator
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "templatecache.selectorLabels" -}}
app.kubernetes.io/name: templatecache-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "templatecache.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* Namespaces that get the copy Jobs' ServiceAccount: the release's and the listed ones. */}}
{{- define "templatecache.moverNamespaces" -}}
{{- $namespaces := list .Release.Namespace -}}
{{- range .Values.copyJobs.namespaces -}}
{{- $namespaces = append $namespaces . -}}
{{- end -}}
{{- $namespaces | uniq | toJson -}}
{{- end -}}
