#!/usr/bin/env bash
# one-apps appliance script of the Flower SuperLink image.
#
# Every stage only calls flower-agent, which reads /run/one-context/one_env, validates it
# and does the work (argv only, no shell with input). Keep logic out of this file.

# Read by the one-apps framework (service.sh).
# shellcheck disable=SC2034
ONE_SERVICE_NAME='Service Flower SuperLink - KVM'
# shellcheck disable=SC2034
ONE_SERVICE_VERSION='1.25.0'
# shellcheck disable=SC2034
ONE_SERVICE_BUILD='0'
# shellcheck disable=SC2034
ONE_SERVICE_SHORT_DESCRIPTION='Flower SuperLink: the federated-learning coordinator (Fleet API 9092, Control API 9093).'
# shellcheck disable=SC2034
ONE_SERVICE_DESCRIPTION='Flower SuperLink: the federated-learning coordinator (Fleet API 9092, Control API 9093). Configured from ONEAPP_* context variables; see flower-agent status.'
# shellcheck disable=SC2034
ONE_SERVICE_RECONFIGURABLE=true
# Name, stage, description, default (one-apps quadruples).
# shellcheck disable=SC2034
ONE_SERVICE_PARAMS=(
    'ONEAPP_FLOWER_VERSION'          'configure' 'Flower version X.Y.Z'                         '1.25.0'
    'ONEAPP_FL_TLS_ENABLED'          'configure' 'TLS between SuperLink and SuperNodes (YES/NO)' 'YES'
    'ONEAPP_FL_LOG_LEVEL'            'configure' 'DEBUG, INFO, WARNING or ERROR'                'INFO'
    'ONEAPP_FL_LOG_FORMAT'           'configure' 'Agent log format: text, or json with the training events' 'text'
    'ONEAPP_FL_ISOLATION'            'configure' 'subprocess or process'                        'subprocess'
    'ONEAPP_FL_RUNTIME'              'configure' 'docker or process'                            'docker'
    'ONEAPP_FL_HEARTBEAT_INTERVAL'   'configure' 'FL_HEARTBEAT refresh interval'                '30s'
    'ONEAPP_FL_TRACEPARENT'          'configure' 'W3C traceparent the agent spans continue (set by the controller)' ''
    'ONEAPP_FL_OTLP_ENDPOINT'        'configure' 'OTLP/HTTP collector base URL for the agent spans' ''
    'ONEAPP_FL_FLEET_PORT'        'configure' 'Fleet API port'                                  '9092'
    'ONEAPP_FL_CONTROL_PORT'      'configure' 'Control API port'                                '9093'
    'ONEAPP_FL_CONTROL_BIND'      'configure' 'Control API bind: loopback or vm'                'loopback'
    'ONEAPP_FL_PERSISTENT_STATE'  'configure' 'Keep SuperLink state in SQLite (YES/NO)'         'YES'
    'ONEAPP_FL_DATABASE'          'configure' 'Database path inside the state directory'        'state.db'
    'ONEAPP_FL_TLS_MODE'          'configure' 'auto (generated CA) or provided'                 'auto'
    'ONEAPP_FL_SSL_CA_CERTFILE'   'configure' 'Provided CA certificate (base64 PEM)'            ''
    'ONEAPP_FL_SSL_CERTFILE'      'configure' 'Provided server certificate (base64 PEM)'        ''
    'ONEAPP_FL_SSL_KEYFILE'       'configure' 'Provided server key (base64 PEM)'                ''
    'ONEAPP_FL_CERT_VALIDITY'     'configure' 'Validity of generated certificates'              '8760h'
    'ONEAPP_FL_CERT_RENEW_BEFORE' 'configure' 'Renew the server certificate this long before expiry' '720h'
    'ONEAPP_FL_CERT_EXTRA_SAN'    'configure' 'Extra SANs: IP:<addr>,DNS:<name>'                ''
    'ONEAPP_FL_CONTROLLER_KEY'    'configure' 'Public key whose signed rotation requests are honoured' ''
    'ONEAPP_FL_METRICS_ENABLED'   'configure' 'Serve Prometheus metrics (YES/NO)'             'NO'
    'ONEAPP_FL_METRICS_PORT'      'configure' 'Prometheus metrics port'                          '9101'
)

FLOWER_AGENT=/usr/local/bin/flower-agent

service_install() {
    "$FLOWER_AGENT" install --role superlink --flower-version "${FLOWER_VERSION:-1.25.0}"
}

service_configure() {
    "$FLOWER_AGENT" configure --role superlink
}

service_bootstrap() {
    "$FLOWER_AGENT" bootstrap --role superlink
}

# one-apps runs cleanup after every stage: it must not touch Flower.
service_cleanup() {
    :
}

service_help() {
    "$FLOWER_AGENT" --help
}
