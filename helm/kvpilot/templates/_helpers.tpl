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
kvpilot.config: the Serve config this release serves, as JSON {text, where, doc}: the user's
file (`--set-file serveConfig=my-models.yaml`, served verbatim) or kvpilot's application
written around `args` given inline in values.
*/}}
{{- define "kvpilot.config" -}}
{{- $text := .Values.serveConfig | default "" -}}
{{- $args := .Values.args -}}
{{- if and $text $args -}}
{{- fail "serveConfig and args are both set: give your Serve config as a file (--set-file serveConfig=my-models.yaml) or kvpilot's args inline in values, not both" -}}
{{- end -}}
{{- if $args -}}
{{- $app := dict "name" "kvpilot" "route_prefix" "/" "import_path" "deployments.app:build_app" "args" $args -}}
{{- $text = toYaml (dict "applications" (list $app)) -}}
{{- toJson (dict "text" $text "where" "args" "doc" (dict "applications" (list $app))) -}}
{{- else -}}
{{- if not $text -}}
{{- fail "serveConfig: no Serve config given: pass your file with --set-file serveConfig=my-models.yaml (the repository's configs/*.yaml are examples), or set args inline in values" -}}
{{- end -}}
{{- $doc := fromYaml $text -}}
{{- if hasKey $doc "Error" -}}
{{- fail (printf "serveConfig: not valid YAML: %s" (get $doc "Error")) -}}
{{- end -}}
{{- toJson (dict "text" $text "where" "serveConfig" "doc" $doc) -}}
{{- end -}}
{{- end -}}

{{/*
kvpilot.schemaErrors: the ways {value, schema, path} breaks a JSON schema (the subset
files/args.schema.json uses: type, enum, bounds, lengths, pattern, items, properties,
required, additionalProperties), one line each, empty when none. cluster/chart/helmschema.py
generates that schema from cluster.config.ClusterConfig; tests/helm check both agree.
*/}}
{{- define "kvpilot.schemaErrors" -}}
{{- $s := .schema -}}{{- $v := .value -}}{{- $p := .path -}}
{{- $kind := "null" -}}
{{- if kindIs "map" $v }}{{ $kind = "object" }}
{{- else if kindIs "slice" $v }}{{ $kind = "array" }}
{{- else if kindIs "string" $v }}{{ $kind = "string" }}
{{- else if kindIs "bool" $v }}{{ $kind = "boolean" }}
{{- else if not (kindIs "invalid" $v) }}{{ $kind = ternary "integer" "number" (eq (float64 $v) (floor $v)) }}
{{- end -}}
{{- $types := list -}}
{{- if kindIs "string" $s.type }}{{ $types = list $s.type }}{{ else if $s.type }}{{ $types = $s.type }}{{ end -}}
{{- $ok := or (not $types) (has $kind $types) (and (eq $kind "integer") (has "number" $types)) -}}
{{- if not $ok -}}
{{ $p }}: {{ $v | toJson }} is {{ ternary "an" "a" (eq $kind "integer" "object" "array") }} {{ $kind }}, want {{ join " or " $types }}
{{ else -}}
{{- if and $s.enum (not (has $v $s.enum)) -}}
{{ $p }}: {{ $v | toJson }} is not one of {{ join ", " $s.enum }}
{{ end -}}
{{- if or (eq $kind "integer") (eq $kind "number") -}}
{{- $n := float64 $v -}}
{{- if and (hasKey $s "minimum") (lt $n (float64 $s.minimum)) }}{{ $p }}: {{ $v }} is below the minimum {{ $s.minimum }}
{{ end -}}
{{- if and (hasKey $s "maximum") (gt $n (float64 $s.maximum)) }}{{ $p }}: {{ $v }} is above the maximum {{ $s.maximum }}
{{ end -}}
{{- if and (hasKey $s "exclusiveMinimum") (le $n (float64 $s.exclusiveMinimum)) }}{{ $p }}: {{ $v }} must be above {{ $s.exclusiveMinimum }}
{{ end -}}
{{- if and (hasKey $s "exclusiveMaximum") (ge $n (float64 $s.exclusiveMaximum)) }}{{ $p }}: {{ $v }} must be below {{ $s.exclusiveMaximum }}
{{ end -}}
{{- else if eq $kind "string" -}}
{{- if and (hasKey $s "minLength") (lt (len $v) (int $s.minLength)) }}{{ $p }}: {{ $v | quote }} is shorter than {{ $s.minLength }} characters
{{ end -}}
{{- if and (hasKey $s "maxLength") (gt (len $v) (int $s.maxLength)) }}{{ $p }}: {{ $v | quote }} is longer than {{ $s.maxLength }} characters
{{ end -}}
{{- if and $s.pattern (not (regexMatch $s.pattern $v)) }}{{ $p }}: {{ $v | quote }} does not match {{ $s.pattern }}
{{ end -}}
{{- else if eq $kind "array" -}}
{{- if and (hasKey $s "minItems") (lt (len $v) (int $s.minItems)) }}{{ $p }}: needs at least {{ $s.minItems }} item(s)
{{ end -}}
{{- if $s.items -}}
{{- range $i, $item := $v }}{{ include "kvpilot.schemaErrors" (dict "schema" $s.items "value" $item "path" (printf "%s[%d]" $p $i)) }}{{ end -}}
{{- end -}}
{{- else if eq $kind "object" -}}
{{- $props := $s.properties | default dict -}}
{{- range $r := $s.required | default list -}}
{{- if not (hasKey $v $r) }}{{ $p }}.{{ $r }}: required field is missing
{{ end -}}
{{- end -}}
{{- range $k, $item := $v -}}
{{- if hasKey $props $k -}}
{{ include "kvpilot.schemaErrors" (dict "schema" (get $props $k) "value" $item "path" (printf "%s.%s" $p $k)) }}
{{- else if kindIs "map" $s.additionalProperties -}}
{{ include "kvpilot.schemaErrors" (dict "schema" $s.additionalProperties "value" $item "path" (printf "%s.%s" $p $k)) }}
{{- else if eq (toString $s.additionalProperties) "false" -}}
{{ $p }}.{{ $k }}: unknown field; known: {{ keys $props | sortAlpha | join ", " }}
{{ end -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/*
kvpilot.plan: what the chart derives from the Serve config, as JSON (use with fromJson).

It finds kvpilot's application the way cluster/config.py's read_serve_args does (the first
application whose import_path is deployments.app:build_app), checks its args against
files/args.schema.json (generated from ClusterConfig), and for each worker group works out
which models it hosts, its GPU type, GPUs per pod (largest tensor_parallel_size ×
pipeline_parallel_size), replica bounds, CPUs and drain times. Defaults mirror
cluster/config.py's ModelConfig (TP, PP, replicas, cpus_per_worker all 1); drain times are
cluster/serving/placement.py's graceful_shutdown_s with the constants of files/drain.json; tests/helm
checks every derived number against ClusterConfig and placement themselves.
*/}}
{{- define "kvpilot.plan" -}}
{{- $config := include "kvpilot.config" . | fromJson -}}
{{- $file := $config.where -}}
{{- $source := ternary "args" "the Serve config (serveConfig)" (eq $file "args") -}}
{{- $doc := $config.doc -}}
{{- $apps := get $doc "applications" -}}
{{- if not (kindIs "slice" $apps) -}}
{{- fail (printf "%s: applications: a Serve config needs a non-empty list of applications" $file) -}}
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
{{- fail (printf "%s: applications: no application with import_path deployments.app:build_app" $file) -}}
{{- end -}}
{{- $args := get $app "args" -}}
{{- $argsPath := ternary "args" (printf "serveConfig: applications[%d].args" $appIndex) (eq $file "args") -}}
{{- $errors := include "kvpilot.schemaErrors" (dict "schema" (.Files.Get "files/args.schema.json" | fromJson) "value" $args "path" $argsPath) | trim -}}
{{- if $errors -}}
{{- fail (printf "the Serve config's kvpilot args are not what cluster.config.ClusterConfig accepts (`kvpilot validate` says more):\n%s" $errors) -}}
{{- end -}}
{{- $ms := get $args "models" -}}
{{- $drainC := .Files.Get "files/drain.json" | fromJson -}}
{{- $catalog := fromYaml (.Files.Get "files/accelerators.yaml") -}}
{{- $models := list -}}
{{- range $i, $m := $ms -}}
{{- $name := toString (get $m "name") -}}
{{- $acc := toString (get $m "accelerator") -}}
{{- if not (hasKey $catalog $acc) -}}
{{- fail (printf "%s.models[%d] (%s) runs on accelerator %q, and this chart's worker groups are GPU pods (%s)" $argsPath $i $name $acc (keys $catalog | sortAlpha | join ", ")) -}}
{{- end -}}
{{- $tp := int (get $m "tensor_parallel_size" | default 1) -}}
{{- $pp := int (get $m "pipeline_parallel_size" | default 1) -}}
{{- $minR := int (get $m "min_replicas" | default 1) -}}
{{- $maxR := int (get $m "max_replicas" | default 1) -}}
{{- $cpw := int (get $m "cpus_per_worker" | default 1) -}}
{{- /* cluster/serving/placement.py longest_generation_tokens and graceful_shutdown_s */ -}}
{{- $tokens := int (get $m "max_model_len") -}}
{{- $limits := get $m "limits" | default dict -}}
{{- if and (get $limits "max_tokens") (lt (int (get $limits "max_tokens")) $tokens) }}{{ $tokens = int (get $limits "max_tokens") }}{{ end -}}
{{- $drainMs := mul $tokens (int $drainC.msPerToken) -}}
{{- $drain := add (div (add $drainMs 999) 1000) (int $drainC.marginSeconds) -}}
{{- $models = append $models (dict "name" $name "accelerator" $acc "tp" $tp "pp" $pp "world" (mul $tp $pp) "minReplicas" $minR "maxReplicas" $maxR "cpusPerWorker" $cpw "tokens" $tokens "drain" $drain) -}}
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
{{- fail (printf "%s.models: %q is not a model of %s, which serves: %s" $where $mn $source (join ", " $modelNames)) -}}
{{- end -}}
{{- end -}}
{{- else if $g.accelerator -}}
{{- range $m := $models -}}
{{- if eq $m.accelerator $g.accelerator -}}
{{- $hosted = append $hosted $m -}}
{{- end -}}
{{- end -}}
{{- if not $hosted -}}
{{- fail (printf "%s.accelerator: %s, but no model of %s runs on it (its models: %s); set models: or the matching accelerator" $where $g.accelerator $source (join ", " $modelNames)) -}}
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
{{- $groupDrain := 0 -}}
{{- range $m := $hosted -}}
{{- if gt (int $m.drain) $groupDrain }}{{ $groupDrain = int $m.drain }}{{ end -}}
{{- if not $acc -}}
{{- $acc = $m.accelerator -}}
{{- end -}}
{{- if ne $m.accelerator $acc -}}
{{- if $g.accelerator -}}
{{- fail (printf "%s.accelerator: %s, but model %s runs on %s in %s: its placement bundles ask for that GPU's accelerator_type resource; give it a worker group on %s (or change the config)" $where $acc $m.name $m.accelerator $source $m.accelerator) -}}
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
{{- range $m := $hosted -}}
{{- if mod $gpus (int $m.tp) -}}
{{- fail (printf "%s.gpusPerPod: %d GPUs do not divide into tensor-parallel groups of %d (model %s): a group must stay within one pod, so %d of each pod's GPUs would idle; use a multiple of %d" $where $gpus (int $m.tp) $m.name (mod $gpus (int $m.tp)) (int $m.tp)) -}}
{{- end -}}
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
{{- $group := dict "name" $g.name "accelerator" $acc "rayType" $rayType "models" $names "gpus" $gpus "replicas" $replicas "minReplicas" $minReplicas "maxReplicas" $maxReplicas "cpu" $cpu "rayStartParams" $params "drain" $groupDrain "terminationGracePeriodSeconds" (add $groupDrain (int $drainC.podStopMarginSeconds)) -}}
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
{{- fail (printf "workerGroups: model %s (accelerator %s) of %s is hosted by no worker group; add one with models: [%s]" $m.name $m.accelerator $source $m.name) -}}
{{- end -}}
{{- end -}}
{{- $autoscaling := false -}}
{{- range $m := $models -}}
{{- if lt (int $m.minReplicas) (int $m.maxReplicas) }}{{ $autoscaling = true }}{{ end -}}
{{- end -}}
{{- if kindIs "bool" .Values.autoscaler.enabled }}{{ $autoscaling = .Values.autoscaler.enabled }}{{ end -}}
{{- $drain := 0 -}}
{{- range $m := $models }}{{ if gt (int $m.drain) $drain }}{{ $drain = int $m.drain }}{{ end }}{{ end -}}
{{- $plan := dict "file" $file "text" $config.text "application" $appIndex "models" $models "groups" $groups "autoscaling" $autoscaling -}}
{{- $_ := set $plan "drain" $drain -}}
{{- $_ := set $plan "terminationGracePeriodSeconds" (add $drain (int $drainC.podStopMarginSeconds)) -}}
{{- $_ := set $plan "msPerToken" (int $drainC.msPerToken) -}}
{{- $_ := set $plan "marginSeconds" (int $drainC.marginSeconds) -}}
{{- $_ := set $plan "upgrade" (include "kvpilot.upgrade" (dict "Values" .Values "autoscaling" $autoscaling) | fromJson) -}}
{{- toJson $plan -}}
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

{{/* The model cache volume: an emptyDir, a PersistentVolumeClaim (yours or the chart's), or a node's directory. */}}
{{- define "kvpilot.modelCacheClaim" -}}
{{- .Values.modelCache.persistentVolumeClaim.existingClaim | default (printf "%s-model-cache" (include "kvpilot.fullname" .)) }}
{{- end }}

{{- define "kvpilot.modelCacheVolume" -}}
{{- $c := .Values.modelCache }}
- name: model-cache
{{- if eq $c.type "persistentVolumeClaim" }}
  persistentVolumeClaim:
    claimName: {{ include "kvpilot.modelCacheClaim" . }}
{{- else if eq $c.type "hostPath" }}
  hostPath:
    path: {{ $c.hostPath.path }}
    type: DirectoryOrCreate
{{- else }}
  emptyDir:
    sizeLimit: {{ $c.sizeLimit }}
{{- end }}
{{- end }}

{{/*
A node directory that kubelet creates is root's; the image runs as ray (uid 1000, gid 100).
This init container (as root, the serving image) hands it over once per pod start.
*/}}
{{- define "kvpilot.modelCacheInit" -}}
{{- $c := .Values.modelCache }}
{{- if and (eq $c.type "hostPath") $c.hostPath.chown }}
- name: model-cache-owner
  image: {{ include "kvpilot.image" . | quote }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  command: ["/bin/sh", "-c", "chown 1000:100 {{ $c.mountPath }}"]
  securityContext:
    runAsUser: 0
    runAsNonRoot: false
  volumeMounts:
    - name: model-cache
      mountPath: {{ $c.mountPath }}
{{- end }}
{{- end }}

{{/*
preStop: wait while this node's Serve proxy or replicas have requests in flight (Ray's own
gauges on the node's metrics port), at most the drain time (argument, seconds), then stop Ray.
The pod is already out of the Service's endpoints, so no new request arrives meanwhile.
tests/helm runs this very command against a fake metrics endpoint.
*/}}
{{- define "kvpilot.preStop" -}}
preStop:
  exec:
    command:
      - /bin/sh
      - -c
      - {{ printf "python3 -c %s %d http://127.0.0.1:8080/metrics; ray stop" (include "kvpilot.drainScript" . | squote) (int .) | quote }}
{{- end }}

{{- define "kvpilot.drainScript" -}}
import re, sys, time, urllib.request
deadline = time.monotonic() + float(sys.argv[1])
busy = re.compile(r"^ray_serve_(num_ongoing_http_requests|replica_processing_queries)(\{[^}]*\})? +([0-9.eE+-]+)", re.M)
def in_flight():
    try:
        text = urllib.request.urlopen(sys.argv[2], timeout=5).read().decode()
    except OSError:
        return 0.0
    return sum(float(m.group(3)) for m in busy.finditer(text))
while time.monotonic() < deadline and in_flight() > 0:
    time.sleep(2)
{{- end }}

{{/*
kvpilot.upgrade: the RayService's upgradeStrategy, checked as KubeRay's operator checks it
(ValidateClusterUpgradeOptions in KubeRay v1.7.0): the incremental strategy needs Ray's
autoscaler and all of gatewayClassName, stepSizePercent and intervalSeconds.
*/}}
{{- define "kvpilot.upgrade" -}}
{{- $u := .Values.upgrade -}}
{{- $out := dict "type" $u.strategy -}}
{{- if eq $u.strategy "NewClusterWithIncrementalUpgrade" -}}
{{- $i := $u.incremental | default dict -}}
{{- if not $i.gatewayClassName -}}
{{- fail "upgrade.incremental.gatewayClassName: required with upgrade.strategy NewClusterWithIncrementalUpgrade: the GatewayClass of your Gateway API controller (e.g. istio); KubeRay creates a Gateway and an HTTPRoute of that class to shift traffic" -}}
{{- end -}}
{{- if not .autoscaling -}}
{{- fail "upgrade.strategy: NewClusterWithIncrementalUpgrade needs Ray's autoscaler (KubeRay refuses it otherwise): set autoscaler.enabled: true, or give a model min_replicas < max_replicas" -}}
{{- end -}}
{{- $opts := dict "gatewayClassName" $i.gatewayClassName "stepSizePercent" (int $i.stepSizePercent) "intervalSeconds" (int $i.intervalSeconds) "maxSurgePercent" (int $i.maxSurgePercent) -}}
{{- $_ := set $out "clusterUpgradeOptions" $opts -}}
{{- end -}}
{{- toJson $out -}}
{{- end -}}
