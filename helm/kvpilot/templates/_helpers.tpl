{{/*
Names. The fullname is capped at 40 characters: KubeRay derives the RayCluster name
(<rayservice>-<5 chars>) and from it pod and Service names, which must stay DNS labels.
*/}}
{{- define "kvpilot.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 40 | trimSuffix "-" }}
{{- end }}

{{- define "kvpilot.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "kvpilot.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kvpilot.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "kvpilot.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "kvpilot.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: kvpilot
{{- end }}

{{- define "kvpilot.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* The Secret the chart creates when secrets.*.value is set. */}}
{{- define "kvpilot.secretName" -}}
{{- printf "%s-secrets" (include "kvpilot.fullname" .) }}
{{- end }}

{{/*
Environment of every Ray container: HF_HOME on the model cache, the optional secrets, extraEnv.
*/}}
{{- define "kvpilot.env" -}}
- name: HF_HOME
  value: {{ .Values.modelCache.mountPath | quote }}
{{- range $pair := list (list "KVPILOT_API_KEYS" "apiKeys") (list "HF_TOKEN" "hfToken") }}
{{- $var := index $pair 0 }}
{{- $s := index $.Values.secrets (index $pair 1) }}
{{- if and $s.value $s.existingSecret }}
{{- fail (printf "secrets.%s: set value (the chart creates a Secret) or existingSecret (yours), not both" (index $pair 1)) }}
{{- end }}
{{- if or $s.value $s.existingSecret }}
- name: {{ $var }}
  valueFrom:
    secretKeyRef:
      name: {{ $s.existingSecret | default (include "kvpilot.secretName" $) }}
      key: {{ $s.key | quote }}
{{- end }}
{{- end }}
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
kvpilot.plan: what the chart derives from the Serve config, as JSON (use with fromJson).

It reads configs/<serveConfig> (the symlink to the repository's configs/), finds kvpilot's
application the way cluster/config.py's read_serve_args does (the first application whose
import_path is deployments.app:build_app), and for each worker group works out which models
it hosts, its GPU type, GPUs per pod (largest tensor_parallel_size × pipeline_parallel_size),
replica bounds and CPUs. Defaults mirror cluster/config.py's ModelConfig (TP, PP, replicas,
cpus_per_worker all 1); tests/helm checks every derived number against ClusterConfig itself.
*/}}
{{- define "kvpilot.plan" -}}
{{- $file := printf "configs/%s" .Values.serveConfig -}}
{{- $raw := .Files.Get $file -}}
{{- if not $raw -}}
{{- fail (printf "serveConfig: %s is missing or empty in the chart; helm/kvpilot/configs must be the symlink to the repository's configs/ (install from a checkout, or from a package made there with `helm package helm/kvpilot`)" $file) -}}
{{- end -}}
{{- $doc := fromYaml $raw -}}
{{- if hasKey $doc "Error" -}}
{{- fail (printf "serveConfig: %s is not valid YAML: %s" $file (get $doc "Error")) -}}
{{- end -}}
{{- $apps := get $doc "applications" -}}
{{- if not (kindIs "slice" $apps) -}}
{{- fail (printf "serveConfig: %s: applications: a Serve config needs a non-empty list of applications" $file) -}}
{{- end -}}
{{- $app := dict -}}
{{- $appIndex := -1 -}}
{{- range $i, $a := $apps -}}
{{- if and (lt $appIndex 0) (kindIs "map" $a) -}}
{{- if eq (toString (get $a "import_path")) "deployments.app:build_app" -}}
{{- $app = $a -}}
{{- $appIndex = $i -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if lt $appIndex 0 -}}
{{- fail (printf "serveConfig: %s: applications: no application with import_path deployments.app:build_app" $file) -}}
{{- end -}}
{{- $args := get $app "args" -}}
{{- $ms := list -}}
{{- if kindIs "map" $args -}}
{{- $ms = get $args "models" -}}
{{- end -}}
{{- if or (not (kindIs "slice" $ms)) (eq (len $ms) 0) -}}
{{- fail (printf "serveConfig: %s: applications[%d].args.models: a non-empty list of models is required" $file $appIndex) -}}
{{- end -}}
{{- $catalog := fromYaml (.Files.Get "files/accelerators.yaml") -}}
{{- $models := list -}}
{{- range $i, $m := $ms -}}
{{- $name := toString (get $m "name") -}}
{{- $acc := toString (get $m "accelerator") -}}
{{- if not (hasKey $catalog $acc) -}}
{{- fail (printf "serveConfig: %s: applications[%d].args.models[%d] (%s) runs on accelerator %q, and this chart's worker groups are GPU pods (%s)" $file $appIndex $i $name $acc (keys $catalog | sortAlpha | join ", ")) -}}
{{- end -}}
{{- $tp := int (get $m "tensor_parallel_size" | default 1) -}}
{{- $pp := int (get $m "pipeline_parallel_size" | default 1) -}}
{{- $minR := int (get $m "min_replicas" | default 1) -}}
{{- $maxR := int (get $m "max_replicas" | default 1) -}}
{{- $cpw := int (get $m "cpus_per_worker" | default 1) -}}
{{- $models = append $models (dict "name" $name "accelerator" $acc "tp" $tp "pp" $pp "world" (mul $tp $pp) "minReplicas" $minR "maxReplicas" $maxR "cpusPerWorker" $cpw) -}}
{{- end -}}
{{- $modelNames := list -}}
{{- range $models }}{{ $modelNames = append $modelNames .name }}{{ end -}}

{{- $wd := .Values.workerDefaults -}}
{{- $groups := list -}}
{{- $seen := dict -}}
{{- $hostedNames := dict -}}
{{- range $gi, $g := .Values.workerGroups -}}
{{- $where := printf "workerGroups[%d] (%s)" $gi $g.name -}}
{{- if hasKey $seen $g.name -}}
{{- fail (printf "%s: name %q is taken by another worker group" $where $g.name) -}}
{{- end -}}
{{- $_ := set $seen $g.name true -}}
{{- $hosted := list -}}
{{- if $g.models -}}
{{- range $mn := $g.models -}}
{{- $found := false -}}
{{- range $m := $models -}}
{{- if eq $m.name $mn -}}
{{- $hosted = append $hosted $m -}}
{{- $found = true -}}
{{- end -}}
{{- end -}}
{{- if not $found -}}
{{- fail (printf "%s.models: %q is not a model of %s, which serves: %s" $where $mn $file (join ", " $modelNames)) -}}
{{- end -}}
{{- end -}}
{{- else if $g.accelerator -}}
{{- range $m := $models -}}
{{- if eq $m.accelerator $g.accelerator -}}
{{- $hosted = append $hosted $m -}}
{{- end -}}
{{- end -}}
{{- if not $hosted -}}
{{- fail (printf "%s.accelerator: %s, but no model of %s runs on it (its models: %s); set models: or the matching accelerator" $where $g.accelerator $file (join ", " $modelNames)) -}}
{{- end -}}
{{- else -}}
{{- $hosted = $models -}}
{{- end -}}
{{- $acc := $g.accelerator | default "" -}}
{{- $maxWorld := 1 -}}
{{- $maxTp := 1 -}}
{{- $tpModel := "" -}}
{{- $minWorld := 0 -}}
{{- $cpw := 1 -}}
{{- $needMin := 0 -}}
{{- $needMax := 0 -}}
{{- $names := list -}}
{{- range $m := $hosted -}}
{{- if not $acc -}}
{{- $acc = $m.accelerator -}}
{{- end -}}
{{- if ne $m.accelerator $acc -}}
{{- if $g.accelerator -}}
{{- fail (printf "%s.accelerator: %s, but model %s runs on %s in %s: its placement bundles ask for that GPU's accelerator_type resource; give it a worker group on %s (or change the config)" $where $acc $m.name $m.accelerator $file $m.accelerator) -}}
{{- else -}}
{{- fail (printf "%s hosts models on %s and %s: give each GPU type its own worker group (workerGroups[].models)" $where $acc $m.accelerator) -}}
{{- end -}}
{{- end -}}
{{- if gt (int $m.world) $maxWorld }}{{ $maxWorld = int $m.world }}{{ end -}}
{{- if gt (int $m.tp) $maxTp }}{{ $maxTp = int $m.tp }}{{ $tpModel = $m.name }}{{ end -}}
{{- if or (eq $minWorld 0) (lt (int $m.world) $minWorld) }}{{ $minWorld = int $m.world }}{{ end -}}
{{- if gt (int $m.cpusPerWorker) $cpw }}{{ $cpw = int $m.cpusPerWorker }}{{ end -}}
{{- $needMin = add $needMin (mul $m.minReplicas $m.world) -}}
{{- $needMax = add $needMax (mul $m.maxReplicas $m.world) -}}
{{- $names = append $names $m.name -}}
{{- $_ := set $hostedNames $m.name true -}}
{{- end -}}
{{- $gpus := $maxWorld -}}
{{- if $g.gpusPerPod -}}
{{- $gpus = int $g.gpusPerPod -}}
{{- if lt $gpus $maxTp -}}
{{- fail (printf "%s.gpusPerPod: %d is below the tensor_parallel_size %d of model %s: a tensor-parallel group must stay within one pod (pipeline stages may span pods)" $where $gpus $maxTp $tpModel) -}}
{{- end -}}
{{- end -}}
{{- $derivedReplicas := int (div (add $needMin (sub $gpus 1)) $gpus) -}}
{{- $derivedMax := int (div (add $needMax (sub $gpus 1)) $gpus) -}}
{{- $replicas := $derivedReplicas -}}
{{- if not (kindIs "invalid" (index $g "replicas")) }}{{ $replicas = int (index $g "replicas") }}{{ end -}}
{{- $minReplicas := $replicas -}}
{{- if not (kindIs "invalid" (index $g "minReplicas")) }}{{ $minReplicas = int (index $g "minReplicas") }}{{ end -}}
{{- $maxReplicas := max $derivedMax $replicas -}}
{{- if not (kindIs "invalid" (index $g "maxReplicas")) }}{{ $maxReplicas = int (index $g "maxReplicas") }}{{ end -}}
{{- if or (lt (int $replicas) (int $minReplicas)) (gt (int $replicas) (int $maxReplicas)) -}}
{{- fail (printf "%s: replicas must lie between minReplicas and maxReplicas, got minReplicas %d, replicas %d, maxReplicas %d" $where (int $minReplicas) (int $replicas) (int $maxReplicas)) -}}
{{- end -}}
{{- $cpu := add (mul $gpus $cpw) (max 1 (div $gpus $minWorld)) 2 -}}
{{- if $g.cpu }}{{ $cpu = int $g.cpu }}{{ end -}}
{{- $rayType := (get $catalog $acc).rayType | default "" -}}
{{- $chartParams := dict -}}
{{- if $rayType -}}
{{- $_ := set $chartParams "resources" (printf "'%s'" (dict (printf "accelerator_type:%s" $rayType) 1 | toJson)) -}}
{{- end -}}
{{- $params := merge (dict) ($g.rayStartParams | default dict) ($wd.rayStartParams | default dict) $chartParams -}}
{{- $group := dict "name" $g.name "accelerator" $acc "rayType" $rayType "models" $names "gpus" $gpus "replicas" $replicas "minReplicas" $minReplicas "maxReplicas" $maxReplicas "cpu" $cpu "rayStartParams" $params -}}
{{- $_ := set $group "memory" ($g.memory | default $wd.memory) -}}
{{- $_ := set $group "sharedMemorySize" ($g.sharedMemorySize | default $wd.sharedMemorySize) -}}
{{- range $k := list "nodeSelector" "tolerations" "affinity" -}}
{{- $_ := set $group $k (ternary (index $g $k) (index $wd $k) (hasKey $g $k)) -}}
{{- end -}}
{{- $_ := set $group "labels" ($g.labels | default dict) -}}
{{- $_ := set $group "annotations" ($g.annotations | default dict) -}}
{{- $groups = append $groups $group -}}
{{- end -}}
{{- range $m := $models -}}
{{- if not (hasKey $hostedNames $m.name) -}}
{{- fail (printf "workerGroups: model %s (accelerator %s) of %s is hosted by no worker group; add one with models: [%s]" $m.name $m.accelerator $file $m.name) -}}
{{- end -}}
{{- end -}}
{{- $autoscaling := false -}}
{{- range $m := $models -}}
{{- if lt (int $m.minReplicas) (int $m.maxReplicas) }}{{ $autoscaling = true }}{{ end -}}
{{- end -}}
{{- if kindIs "bool" .Values.autoscaler.enabled }}{{ $autoscaling = .Values.autoscaler.enabled }}{{ end -}}
{{- toJson (dict "file" $file "application" $appIndex "models" $models "groups" $groups "autoscaling" $autoscaling) -}}
{{- end -}}

{{/* Pod spec fields shared by head and workers. */}}
{{- define "kvpilot.podCommon" -}}
{{- with .Values.serviceAccountName }}
serviceAccountName: {{ . }}
{{- end }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.podSecurityContext }}
securityContext:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* The model cache volume: an existing claim, or an emptyDir with a size limit. */}}
{{- define "kvpilot.modelCacheVolume" -}}
- name: model-cache
{{- if .Values.modelCache.existingClaim }}
  persistentVolumeClaim:
    claimName: {{ .Values.modelCache.existingClaim }}
{{- else }}
  emptyDir:
    sizeLimit: {{ .Values.modelCache.sizeLimit }}
{{- end }}
{{- end }}
