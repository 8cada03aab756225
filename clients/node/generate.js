#!/usr/bin/env node
// Streams a completion from the llmsuite gateway with @grpc/grpc-js.
//
//   node generate.js [--address HOST:PORT] [--model tiny] [--max-new-tokens N]
//                    [--temperature T] [--top-p P] [--request-id ID] PROMPT
//
// Text deltas go to stdout as they arrive; the last stdout line is the final
// summary as JSON. The address defaults to $LLMSUITE_ADDRESS, then
// localhost:50050; $LLMSUITE_API_KEY is sent as a bearer token. Requests are
// gzip-compressed. Errors print one line on stderr, decoded from the rich
// status (reason, field violations, retry delay); exit codes: 0 ok, 1 failed
// call, 2 bad usage, 130 interrupted.
'use strict';

const path = require('node:path');
const { parseArgs } = require('node:util');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const protobuf = require('protobufjs');

const PROTO_ROOT = path.resolve(__dirname, '..', '..', 'protos');
const GZIP = 2; // grpc-js compression algorithms: 0 identity, 1 deflate, 2 gzip

function parseCommandLine(argv) {
  const { values, positionals } = parseArgs({
    args: argv,
    allowPositionals: true,
    options: {
      address: { type: 'string', default: process.env.LLMSUITE_ADDRESS || 'localhost:50050' },
      model: { type: 'string', default: 'tiny' },
      'max-new-tokens': { type: 'string' },
      temperature: { type: 'string' },
      'top-p': { type: 'string' },
      'request-id': { type: 'string' },
      help: { type: 'boolean', short: 'h' },
    },
  });
  if (values.help || positionals.length !== 1) {
    throw new Error('usage: node generate.js [--address HOST:PORT] [--model NAME] [--max-new-tokens N] '
      + '[--temperature T] [--top-p P] [--request-id ID] PROMPT');
  }
  return { ...values, prompt: positionals[0] };
}

function buildRequest(args) {
  const sampling = {};
  if (args['max-new-tokens'] !== undefined) sampling.max_new_tokens = Number(args['max-new-tokens']);
  // temperature and top_p are proto3 `optional`: leave them out to get the server's default.
  if (args.temperature !== undefined) sampling.temperature = Number(args.temperature);
  if (args['top-p'] !== undefined) sampling.top_p = Number(args['top-p']);
  return { model: args.model, prompt: args.prompt, sampling };
}

// google.rpc.Status and the details llmsuite sends, declared by field number
// only (wire-compatible with google/rpc/*.proto), to read grpc-status-details-bin.
const RPC_DETAILS = protobuf.parse(`
  syntax = "proto3";
  package llmsuite_example.rpc;
  message Status { int32 code = 1; string message = 2; repeated AnyDetail details = 3; }
  message AnyDetail { string type_url = 1; bytes value = 2; }
  message ErrorInfo { string reason = 1; string domain = 2; map<string, string> metadata = 3; }
  message BadRequest {
    message FieldViolation { string field = 1; string description = 2; }
    repeated FieldViolation field_violations = 1;
  }
  message Duration { int64 seconds = 1; int32 nanos = 2; }
  message RetryInfo { Duration retry_delay = 1; }
`, { keepCase: true }).root;

function seconds(duration) {
  return duration ? Number(duration.seconds || 0) + (duration.nanos || 0) / 1e9 : 0;
}

// One readable line, e.g. "INVALID_ARGUMENT: sampling.top_p: must be in (0, 1] [reason INVALID_FIELD]".
function describeError(err) {
  const codeName = Object.keys(grpc.status).find((name) => grpc.status[name] === err.code) || String(err.code);
  const notes = [];
  const raw = err.metadata ? err.metadata.get('grpc-status-details-bin')[0] : undefined;
  if (raw) {
    const status = RPC_DETAILS.lookupType('Status').decode(raw);
    for (const detail of status.details) {
      const kind = detail.type_url.split('/').pop();
      if (kind === 'google.rpc.ErrorInfo') {
        notes.push(`reason ${RPC_DETAILS.lookupType('ErrorInfo').decode(detail.value).reason}`);
      } else if (kind === 'google.rpc.RetryInfo') {
        const info = RPC_DETAILS.lookupType('RetryInfo').decode(detail.value);
        notes.push(`retry after ${seconds(info.retry_delay)}s`);
      } else if (kind === 'google.rpc.BadRequest') {
        const bad = RPC_DETAILS.lookupType('BadRequest').decode(detail.value);
        // The message already names the first field; list any others.
        for (const v of bad.field_violations.slice(1)) notes.push(`${v.field}: ${v.description}`);
      }
    }
  }
  return `${codeName}: ${err.details}${notes.length ? ` [${notes.join(', ')}]` : ''}`;
}

function summaryJson(requestId, text, final) {
  const usage = final.usage || {};
  const timings = final.timings || {};
  let matchedStop = null;
  if (final.matched_stop_string) matchedStop = final.matched_stop_string;
  else if (final.matched_stop_token_id !== undefined && final.matched_stop_token_id !== null) {
    matchedStop = final.matched_stop_token_id;
  }
  return JSON.stringify({
    request_id: requestId,
    text,
    finish_reason: String(final.finish_reason).replace(/^FINISH_REASON_/, '').toLowerCase(),
    usage: {
      prompt_tokens: usage.prompt_tokens || 0,
      completion_tokens: usage.completion_tokens || 0,
      cached_tokens: usage.cached_tokens || 0,
    },
    timings: {
      queue_s: seconds(timings.queue_time),
      prefill_s: seconds(timings.prefill_time),
      time_to_first_token_s: seconds(timings.time_to_first_token),
      mean_inter_token_latency_s: seconds(timings.mean_inter_token_latency),
      total_s: seconds(timings.total_time),
    },
    matched_stop: matchedStop,
  });
}

async function main(argv) {
  let args;
  try {
    args = parseCommandLine(argv);
  } catch (err) {
    console.error(err.message);
    return 2;
  }
  // keepCase keeps the proto's snake_case names; google/protobuf/duration.proto
  // is found through proto-loader's bundled well-known types.
  const definition = protoLoader.loadSync('llmsuite/gateway/v1/gateway.proto', {
    includeDirs: [PROTO_ROOT], keepCase: true, longs: String, enums: String, oneofs: true,
  });
  const { GatewayService } = grpc.loadPackageDefinition(definition).llmsuite.gateway.v1;
  const client = new GatewayService(args.address, grpc.credentials.createInsecure(), {
    'grpc.default_compression_algorithm': GZIP,
  });

  const metadata = new grpc.Metadata();
  if (process.env.LLMSUITE_API_KEY) metadata.set('authorization', `Bearer ${process.env.LLMSUITE_API_KEY}`);
  if (args['request-id']) metadata.set('x-request-id', args['request-id']);

  const call = client.GenerateStream(buildRequest(args), metadata);
  let interrupted = false;
  process.once('SIGINT', () => { interrupted = true; call.cancel(); });

  let requestId = '';
  let text = '';
  let final = null;
  try {
    for await (const response of call) {
      requestId = response.request_id || requestId;
      if (response.kind === 'delta') {
        process.stdout.write(response.delta.text);
        text += response.delta.text;
      } else if (response.kind === 'final') {
        final = response.final;
      }
    }
  } catch (err) {
    if (text) process.stdout.write('\n');
    if (interrupted) return 130;
    console.error(describeError(err));
    return 1;
  } finally {
    client.close();
  }
  if (final === null) {
    console.error('INTERNAL: the stream ended without its final message');
    return 1;
  }
  process.stdout.write(`\n${summaryJson(requestId, text, final)}\n`);
  return 0;
}

main(process.argv.slice(2)).then((code) => { process.exitCode = code; });
