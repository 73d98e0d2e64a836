// loraplex adapter-affinity routing key, for nginx's njs module (written for njs 0.7.9, Debian bookworm).
//
// nginx.conf uses it as `js_set $loraplex_adapter loraplex_route.adapterKey;` and hashes requests onto
// replicas by it (`hash $loraplex_hash_key consistent;`, through a map for base-model names). The key is the
// adapter a request names, first non-empty of:
//   1. the X-Loraplex-Adapter request header (cheap, works for any body and any route);
//   2. the JSON body, on the routes that name an adapter there:
//        POST /v1/completions, /v1/chat/completions     {"model": "<name>"}
//        POST /generate, /generate_stream, /             {"parameters": {"adapter_id": "<name>"}}
//        POST /v1/load_lora_adapter, /v1/unload_lora_adapter   {"lora_name": "<name>"}
//   3. the path, for /v1/adapters/<name>;
//   4. "" (none): base-model requests without a name, GETs, ... nginx's hash spreads an empty key round robin.
// A value that is not a plain token (see NAME below) counts as absent. A body that cannot be read or parsed
// (not JSON; larger than client_body_buffer_size, so nginx spooled it to a file) also counts as absent: the
// next rule decides. This function never throws: a routing key must never fail a request.
//
// The body is there when the key is computed: nginx evaluates the variable when it picks the upstream peer,
// and with proxy_request_buffering on (the default) that happens after the whole body has been read. njs
// 0.7.9: r.requestText is undefined without a body and throws "request body is in a file" when nginx
// spooled it to disk; js_set values are computed once per request and then cached.

// Accepted names: printable ASCII without spaces, at most 256 characters. Wider than loraplex's adapter names
// ([A-Za-z0-9._-]{1,128}, one '/' allowed after a namespace) so base-model ids such as "org/model" route too; narrow enough that the key is
// always a safe response-header value (it is echoed in X-Loraplex-Route-Key).
var NAME = /^[\x21-\x7e]{1,256}$/;

function name(value) {
    return typeof value === 'string' && NAME.test(value) ? value : '';
}

function isObject(value) {
    return value !== null && typeof value === 'object' && !Array.isArray(value);
}

function openaiModel(body) {
    return name(body.model);
}

function tgiAdapterId(body) {
    return isObject(body.parameters) ? name(body.parameters.adapter_id) : '';
}

function loraName(body) {
    return name(body.lora_name);
}

// Routes whose JSON body names the adapter, and where. r.uri is the normalized path, without the query.
var BODY_FIELD = {
    '/v1/completions': openaiModel,
    '/v1/chat/completions': openaiModel,
    '/generate': tgiAdapterId,
    '/generate_stream': tgiAdapterId,
    '/': tgiAdapterId,  // TGI's compat route (LoRAX's Python client posts there)
    '/v1/load_lora_adapter': loraName,
    '/v1/unload_lora_adapter': loraName
};

function fromBody(r) {
    var field = BODY_FIELD[r.uri];
    if (r.method !== 'POST' || field === undefined) {
        return '';
    }
    var text;
    try {
        // undefined when there is no body; njs 0.7.x throws "request body is in a file" when nginx spooled
        // it to disk (larger than client_body_buffer_size): both mean "not readable here".
        text = r.requestText;
    } catch (e) {
        return '';
    }
    if (!text) {
        return '';
    }
    var body;
    try {
        body = JSON.parse(text);
    } catch (e) {
        return '';
    }
    return isObject(body) ? field(body) : '';
}

// A name may carry one '/' after a namespace (acme/support): the key is the whole name.
var ADAPTER_PATH = /^\/v1\/adapters\/([^\/]+(?:\/[^\/]+)?)\/?$/;

function fromPath(r) {
    var match = ADAPTER_PATH.exec(r.uri);
    return match ? name(match[1]) : '';
}

function adapterKey(r) {
    try {
        return name(r.headersIn['X-Loraplex-Adapter']) || fromBody(r) || fromPath(r);
    } catch (e) {
        r.error('loraplex_route: cannot compute the routing key: ' + e);
        return '';
    }
}

export default { adapterKey };
