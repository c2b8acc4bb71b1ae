#!/usr/bin/env node
// Starts kinesalite, an in-memory Kinesis emulator, on 127.0.0.1 only.
// Its own CLI always binds every interface, so dev/stack runs this instead.
//
// Usage: node dev/aws/kinesalite.js PORT
// (dev/stack sets NODE_PATH so that require('kinesalite') finds the copy it
// installed under $STACK_DIR/npm.)
'use strict'

const port = Number(process.argv[2])
if (!Number.isInteger(port) || port < 1 || port > 65535) {
  console.error('usage: kinesalite.js PORT')
  process.exit(2)
}

// Short state transitions so tests don't wait for CREATING -> ACTIVE;
// a high shard limit so tests can create many streams.
const server = require('kinesalite')({
  createStreamMs: 10,
  deleteStreamMs: 10,
  updateStreamMs: 10,
  shardLimit: 200,
})

server.on('error', (err) => {
  console.error(`kinesalite: ${err.message}`)
  process.exit(1)
})

server.listen(port, '127.0.0.1', () => {
  const { address, port: bound } = server.address()
  console.log(`kinesalite listening on http://${address}:${bound} (in memory, pid ${process.pid})`)
})
