#!/usr/bin/env bash
# one-apps appliance script of the Flower SuperNode image.
#
# Every stage only calls flower-agent, which reads /run/one-context/one_env, validates it
# and does the work (argv only, no shell with input). Keep logic out of this file.

# Read by the one-apps framework (service.sh).
# shellcheck disable=SC2034
ONE_SERVICE_NAME='Service Flower SuperNode - KVM'
# shellcheck disable=SC2034
ONE_SERVICE_VERSION='1.25.0'
# shellcheck disable=SC2034
ONE_SERVICE_BUILD='0'
# shellcheck disable=SC2034
ONE_SERVICE_SHORT_DESCRIPTION='Flower SuperNode: a federated-learning training node that joins the SuperLink of its service.'
# shellcheck disable=SC2034
ONE_SERVICE_DESCRIPTION='Flower SuperNode: a federated-learning training node that joins the SuperLink of its service. Configured from ONEAPP_* context variables; see flower-agent status.'
# shellcheck disable=SC2034
ONE_SERVICE_RECONFIGURABLE=true
# Name, stage, description, default (one-apps quadruples).
# shellcheck disable=SC2034
ONE_SERVICE_PARAMS=(
    'ONEAPP_FLOWER_VERSION'          'configure' 'Flower version X.Y.Z'                         '1.25.0'
    'ONEAPP_FL_TLS_ENABLED'          'configure' 'TLS between SuperLink and SuperNodes (YES/NO)' 'YES'
    'ONEAPP_FL_LOG_LEVEL'            'configure' 'DEBUG, INFO, WARNING or ERROR'                'INFO'
    'ONEAPP_FL_LOG_FORMAT'           'configure' 'Agent log format: text or json'               'text'
    'ONEAPP_FL_ISOLATION'            'configure' 'subprocess or process'                        'subprocess'
    'ONEAPP_FL_RUNTIME'              'configure' 'docker or process'                            'docker'
    'ONEAPP_FL_HEARTBEAT_INTERVAL'   'configure' 'FL_HEARTBEAT refresh interval'                '30s'
    'ONEAPP_FL_TRACEPARENT'          'configure' 'W3C traceparent the agent spans continue (set by the controller)' ''
    'ONEAPP_FL_OTLP_ENDPOINT'        'configure' 'OTLP/HTTP collector base URL for the agent spans' ''
    'ONEAPP_FL_FRAMEWORK'            'configure' 'pytorch, tensorflow, sklearn or none'         'pytorch'
    'ONEAPP_FL_SUPERLINK_ADDRESS'    'configure' 'Static SuperLink host:port (empty: OneGate)'  ''
    'ONEAPP_FL_SSL_CA_CERTFILE'      'configure' 'CA to trust with a static address (base64)'   ''
    'ONEAPP_FL_NODE_CONFIG'          'configure' 'key=value ... (empty: partition from role)'   ''
    'ONEAPP_FL_MAX_RETRIES'          'configure' 'Reconnect attempts (0: unlimited)'            '0'
    'ONEAPP_FL_MAX_WAIT_TIME'        'configure' 'Reconnect time limit in seconds (0: none)'    '0'
    'ONEAPP_FL_DISCOVERY_TIMEOUT'    'configure' 'How long to wait for the SuperLink'           '10m'
    'ONEAPP_FL_DATA_DIR'             'configure' 'Training data directory (read-only)'          '/opt/flower/data'
    'ONEAPP_FL_GPU_ENABLED'          'configure' 'Use an NVIDIA GPU when present (YES/NO)'      'NO'
    'ONEAPP_FL_CUDA_VISIBLE_DEVICES' 'configure' 'all or 0,1,...'                               'all'
    'ONEAPP_FL_GPU_MEMORY_FRACTION'  'configure' 'GPU memory fraction for the ClientApp'        '0.8'
    'ONEAPP_FL_DCGM_ENABLED'         'configure' 'Run the DCGM exporter (YES/NO)'               'NO'
    'ONEAPP_FL_METRICS_ENABLED'   'configure' 'Serve Prometheus metrics (YES/NO)'             'NO'
    'ONEAPP_FL_METRICS_PORT'      'configure' 'Prometheus metrics port'                          '9101'
)

FLOWER_AGENT=/usr/local/bin/flower-agent

service_install() {
    "$FLOWER_AGENT" install --role supernode --flower-version "${FLOWER_VERSION:-1.25.0}"
}

service_configure() {
    "$FLOWER_AGENT" configure --role supernode
}

service_bootstrap() {
    "$FLOWER_AGENT" bootstrap --role supernode
}

# one-apps runs cleanup after every stage: it must not touch Flower.
service_cleanup() {
    :
}

service_help() {
    "$FLOWER_AGENT" --help
}
